"""Code for tests only: misbehaving peers (`adversaries`). Production modules never import this package;
`peers.cli` imports it lazily, only for the hidden `--adversary` option."""
