"""Decode speed over emulated WAN links: ms per token with a set one-way delay on every link to a peer (issue 15).

Three peers of the default model (blocks 0:10, 10:20, 20:30) on 127.0.0.1, each behind a delaying TCP relay
(peers.testing.netem, in a process of its own) whose address it announces instead of its own
(`swarm-peer join --announce-maddrs`), so the client and the other peers reach it over a link with one-way delay
d each way (a round trip through it costs 2d). The bootstrap node is dialled directly: it is off the decode path.
tc netem is not available on these machines; the relays are the stand-in.

For d in 0, 10, 25 ms (set on the running relays; the swarm stays up), each decode path, warmed up once, greedily
decodes the chat prompt "What is the capital of France?" (EOS suppressed) a few rounds, the rounds going through
the delays in turn; the median ms per token (between the first and the last new token) is reported, and the
shortest gap between two tokens, which other load on a shared machine disturbs least. The delay's lower bound per
token is d x (one-way link crossings per token): the client-driven path makes a round trip to each peer, 2 x hops x d;
the push chain crosses client -> p1 -> p2 -> p3 -> client, (hops + 1) x d.
Every relay must carry the decode's hidden states (checked from their byte counts), else the client bypassed it.

Who dials whom (checked once with psutil on a running swarm): p2pd announces only the -announceAddrs, so the
client's p2pd holds connections to the three relay ports and the bootstrap node, none to a peer's own port; a peer
dials other peers through their relays too (from its listening port, which libp2p reuses for outgoing dials), so
each connection between two nodes crosses exactly one relay, the dialled peer's, and gets delay d each way.

A decode path is a `DecodePath` in `PATHS`: the push chain and speculative decoding add theirs as new columns.

    python benchmarks/wan.py [--delays 0,10,25] [--tokens 32] [--rounds 5]   # writes benchmarks/results/wan.txt
"""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp

prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Protocol  # noqa: E402

import torch  # noqa: E402

from peers.local import LocalSwarm  # noqa: E402
from peers.testing.netem import RelayProcess, RelayStats, free_port  # noqa: E402
from peers.testing.streamers import TokenTimes  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "wan.txt"
LAYOUT = ("0:10", "10:20", "20:30")
PROMPT = "What is the capital of France?"
MIN_RELAY_BYTES_PER_TOKEN = 1024  # a token's hidden state, [1, 1, 576] float32, is 2.3 KB each way


@dataclass(frozen=True)
class Bench:
    """What a decode path gets: the swarm to join and the work to time."""

    initial_peers: str
    prompt: torch.Tensor  # (1, prompt length) token ids
    tokens: int  # new tokens per timed round
    hops: int  # peers on the route


@dataclass(frozen=True)
class Timing:
    ms_per_token: float  # between the first and the last new token, over the tokens after the first
    min_gap_ms: float  # the shortest time between two new tokens: the least disturbed by other load on the machine


class DecodePath(Protocol):
    """One group of columns of the table: a way to decode through the swarm."""

    name: str

    def links_per_token(self, hops: int) -> int:
        """One-way link crossings per new token, for the delay's lower bound."""

    def decode(self, tokens: int) -> Timing:
        """Decode `tokens` new tokens at the links' current delay."""

    def close(self) -> None: ...


def timing(times: TokenTimes) -> Timing:
    gaps = times.gaps()
    return Timing(sum(gaps) * 1000 / len(gaps), min(gaps) * 1000)


class ClientDriven:
    """The client sends each token's hidden states to every peer in turn over open streams."""

    name = "client-driven"
    push = False

    def __init__(self, bench: Bench):
        self.prompt = bench.prompt
        self.model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [bench.initial_peers], push=self.push)

    def links_per_token(self, hops: int) -> int:
        return 2 * hops  # a round trip to each peer

    def decode(self, tokens: int) -> Timing:
        times = TokenTimes()
        output = self.model.generate(self.prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     streamer=times)
        assert output.shape[1] == self.prompt.shape[1] + tokens and len(times.times) == tokens
        return timing(times)

    def close(self) -> None:
        self.model.shutdown()


class PushChain(ClientDriven):
    """The client sends every hop its request at once; each peer pushes its output to the next and replies to
    the client, so a token crosses client -> p1 -> p2 -> p3 -> client: hops + 1 links."""

    name = "push chain"
    push = True

    def links_per_token(self, hops: int) -> int:
        return hops + 1

    def decode(self, tokens: int) -> Timing:
        times = TokenTimes()
        with self.model.inference_session(max_length=self.prompt.shape[1] + tokens) as session:
            output = self.model.generate(self.prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                         streamer=times, session=session)
            pushed = session.inner.pushed_steps
        assert output.shape[1] == self.prompt.shape[1] + tokens and len(times.times) == tokens
        if pushed != tokens - 1:  # each decode step went through the chain, none fell back to the client-driven path
            raise RuntimeError(f"only {pushed} of {tokens - 1} decode steps went through the push chain")
        return timing(times)


class Speculative(PushChain):
    """The push chain with speculative decoding: each step also carries up to 8 tokens guessed by prompt lookup,
    and the peers' one pass verifies them, so a round trip may bring several tokens (`swarm.speculative`)."""

    name = "speculative"
    LOOKUP = 8

    def __init__(self, bench: Bench):
        super().__init__(bench)
        self.trips: list[float] = []  # tokens per round trip of each timed decode

    def links_per_token(self, hops: int) -> float:
        return round((hops + 1) / (statistics.median(self.trips) if self.trips else 1.0), 1)

    def decode(self, tokens: int) -> Timing:
        times = TokenTimes()
        output = self.model.generate(self.prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     streamer=times, prompt_lookup_num_tokens=self.LOOKUP)
        assert output.shape[1] == self.prompt.shape[1] + tokens and len(times.times) == tokens
        decoding = self.model.last_generation.decoding
        self.trips.append(decoding.tokens_per_round_trip)  # the prompt's step counted, as DecodeStats counts
        return timing(times)


PATHS: list[Callable[[Bench], DecodePath]] = [ClientDriven, PushChain, Speculative]


def relayed_bytes(before: dict[int, RelayStats], after: dict[int, RelayStats]) -> dict[int, int]:
    """Bytes each relay carried (both ways) between two readings, by target port."""
    return {port: (after[port].bytes_to_target + after[port].bytes_from_target
                   - before[port].bytes_to_target - before[port].bytes_from_target) for port in after}


@dataclass
class Row:
    delay_ms: float
    timings: dict[str, list[Timing]] = field(default_factory=dict)  # every timed round, by path name
    carried: dict[int, int] = field(default_factory=dict)  # bytes through each relay in the timed rounds, by port
    tokens: int = 0  # new tokens decoded in the timed rounds, all paths together

    def ms_per_token(self, name: str) -> float:
        return statistics.median(t.ms_per_token for t in self.timings[name])

    def min_gap_ms(self, name: str) -> float:
        return min(t.min_gap_ms for t in self.timings[name])


def measure(relays: RelayProcess, paths: list[DecodePath], bench: Bench, delays: list[float], rounds: int) -> list[Row]:
    """Every path at every delay, `rounds` times; rounds go through the delays in turn, so that each delay sees
    the same mix of other load on the machine."""
    for path in paths:
        path.decode(8)  # warm-up: route, pings, streams
    rows = [Row(delay, carried={port: 0 for port in relays.ports}) for delay in delays]
    for round_number in range(rounds):
        for row in rows:
            relays.set_delay(row.delay_ms)
            for path in paths:
                before = relays.stats()
                timing = path.decode(bench.tokens)
                for port, count in relayed_bytes(before, relays.stats()).items():
                    row.carried[port] += count
                row.timings.setdefault(path.name, []).append(timing)
                row.tokens += bench.tokens
                print(f"round {round_number + 1}, d={row.delay_ms:g} ms, {path.name}: {timing.ms_per_token:.1f} "
                      f"ms/token (min gap {timing.min_gap_ms:.1f} ms)", flush=True)
    for row in rows:
        bypassed = [port for port, count in row.carried.items() if count < MIN_RELAY_BYTES_PER_TOKEN * row.tokens]
        if bypassed:
            raise RuntimeError(f"at d={row.delay_ms:g} ms the relays in front of the peers on ports {bypassed} carried "
                               f"almost nothing ({row.carried}): the client reached those peers some other way")
    return rows


def render(rows: list[Row], paths: list[DecodePath], args: argparse.Namespace, hops: int) -> str:
    lines = [
        f"Decode over emulated WAN links: {DEFAULT_MODEL} float32, {hops} peers ({', '.join(LAYOUT)}) on 127.0.0.1, "
        f"each behind a relay with one-way delay d",
        f"greedy, chat prompt {PROMPT!r}, {args.tokens} new tokens, median of {args.rounds} rounds (alternating the "
        f"delays) after a warm-up; {torch.get_num_threads()} torch threads per process, {os.cpu_count()} cores",
        "ms/token: between the first and the last new token; over d=0: minus its value at d=0; min gap: the shortest "
        "time between two new tokens in any round;",
        "bound: d x one-way link crossings per token (client-driven: 2 x hops x d, push chain: (hops + 1) x d, speculative: "
        "(hops + 1) x d / tokens per round trip); KB/relay/token: bytes each relay carried both ways in the timed rounds "
        "(prompts included)",
        "",
    ]
    header = f"{'delay_ms':>8}"
    for path in paths:
        header += f"{path.name + ' ms/token':>26}{'over d=0':>10}{'min gap':>9}{'bound':>7}"
    header += f"{'KB/relay/token':>16}"
    lines += [header, "-" * len(header)]
    base = rows[0] if rows and rows[0].delay_ms == 0 else None
    for row in rows:
        line = f"{row.delay_ms:>8g}"
        for path in paths:
            over = f"{row.ms_per_token(path.name) - base.ms_per_token(path.name):.1f}" if base else "n/a"
            bound = path.links_per_token(hops) * row.delay_ms
            line += f"{row.ms_per_token(path.name):>26.1f}{over:>10}{row.min_gap_ms(path.name):>9.1f}{bound:>7.3g}"
        kb = statistics.mean(row.carried.values()) / row.tokens / 1024
        lines.append(line + f"{kb:>16.1f}")
    if len(paths) > 1:
        first = paths[0].name
        lines.append("")
        lines += [f"{path.name} / {first} at d={row.delay_ms:g} ms: "
                  f"{row.ms_per_token(path.name) / row.ms_per_token(first):.2f}x"
                  for path in paths[1:] for row in rows]
    for path in paths:
        if isinstance(path, Speculative) and path.trips:
            lines.append(f"speculative decoding (prompt lookup, up to {path.LOOKUP} guessed tokens per step) on the chat "
                         f"prompt: {statistics.median(path.trips):.2f} new tokens per round trip (the prompt's step included)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,10,25", help="one-way delays per link, ms, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]

    tokenizer = open_model(DEFAULT_MODEL).load_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    peer_ports = [free_port() for _ in LAYOUT]
    with RelayProcess(peer_ports, delay_ms=0) as relays, LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.add_peers(*((f"peer{i}", blocks, ["--port", str(port),
                                               "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{relays.ports[port]}"])
                          for i, (blocks, port) in enumerate(zip(LAYOUT, peer_ports))))
        bench = Bench(swarm.initial_peers, prompt, args.tokens, hops=len(LAYOUT))
        paths: list[DecodePath] = []
        try:
            for make in PATHS:
                paths.append(make(bench))
            rows = measure(relays, paths, bench, delays, args.rounds)
        finally:
            for path in paths:
                path.close()
    table = render(rows, paths, args, bench.hops)
    print("\n" + table)
    args.output.write_text(f"$ python benchmarks/wan.py --delays {args.delays} --tokens {args.tokens} "
                           f"--rounds {args.rounds}   # {time.strftime('%Y-%m-%d')}\n{table}\n")
    print(f"(saved to {args.output})")


if __name__ == "__main__":
    main()
