"""Code for tests and benchmarks only: misbehaving peers (`adversaries`), delaying TCP relays that emulate WAN links
(`netem`). Production modules never import this package; `peers.cli` imports it lazily, only for the hidden
`--adversary` option."""
