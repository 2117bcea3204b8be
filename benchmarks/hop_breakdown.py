"""Where a decode step's hop time goes, on loopback: the default model's greedy decode through 1 and 3 real peers,
with every stage of a step timed (`peers.testing.hop_timing` wraps the functions in the client and in each peer).

Each swarm size runs a client child process per code tree (this one, and with `--baseline DIR` another export of
the project, e.g. `git archive main | tar -x -C DIR`; this script's timing module is copied into it), each with its
own swarm; rounds alternate between the trees and the single-process local baseline (decode_speed.py's), so all
see the same machine load. Stage figures are means per call over every step of every round (5% trimmed at each end:
the prefills, the worst preemptions), times calls per hop-step; derived rows are differences of those. Beside the
wall time, each plain function's stage shows the CPU time its thread spent in it: on a shared machine the wall
time also holds waits for a core.

    python benchmarks/hop_breakdown.py [--tokens 64] [--rounds 3] [--peers 1,3] [--baseline DIR]
"""

from __future__ import annotations

import os
import sys

# first: it keeps the environment as given for the local baseline, then prefers passive OpenMP waits as the
# entry points do (for this process and its children)
from decode_speed import LAYOUTS, LocalBaseline, benchmark_prompt, median_run, timed

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


TIMING_MODULE = Path("peers/testing/hop_timing.py")
CPU_SUFFIX = " cpu"  # peers.testing.hop_timing.CPU (not imported: this process runs no timed code)
FLUSH_WAIT = 1.5  # seconds: the peers write their samples each second


def serve_rounds(peers: int, tokens: int) -> None:
    """Child mode: a swarm of timed peers and a timed client in this tree; one generation per stdin line, answered
    with a JSON line of its speed and the samples of every stage since the previous one."""
    from peers.local import LocalSwarm
    from peers.testing.hop_timing import CLIENT_STAGES, CLOCK, install
    from swarm import DistributedModelForCausalLM
    from swarm.models import DEFAULT_MODEL, open_model

    install(CLIENT_STAGES)
    prompt = benchmark_prompt(open_model(DEFAULT_MODEL).load_tokenizer())
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        files = [swarm.log_dir / f"timing{i}.json" for i in range(peers)]
        started = [swarm.add_peer(blocks, wait=False, launcher=(sys.executable, "-m", "peers.testing.hop_timing",
                                                                "--out", str(file), "--"))
                   for blocks, file in zip(LAYOUTS[peers], files)]
        for peer in started:
            swarm.wait_online(peer)
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
        try:
            timed(model.generate, prompt, 8)  # warm-up: route, pings, streams
            time.sleep(FLUSH_WAIT)
            client_mark, peer_marks = CLOCK.snapshot(), [_counts(_read(f)) for f in files]
            print("ready", flush=True)
            for _ in sys.stdin:
                run = timed(model.generate, prompt, tokens)
                time.sleep(FLUSH_WAIT)
                peer_samples = [_since(_read(f), mark) for f, mark in zip(files, peer_marks)]
                client = CLOCK.since(client_mark)
                client_mark, peer_marks = CLOCK.snapshot(), [_counts(_read(f)) for f in files]
                print(json.dumps({"tokens_per_s": run.tokens_per_s, "client": client, "peers": peer_samples}),
                      flush=True)
        finally:
            model.shutdown()


def _read(path: Path) -> dict[str, list[float]]:
    return json.loads(path.read_text()) if path.exists() else {}


def _counts(samples: dict[str, list[float]]) -> dict[str, int]:
    return {stage: len(values) for stage, values in samples.items()}


def _since(samples: dict[str, list[float]], mark: dict[str, int]) -> dict[str, list[float]]:
    return {stage: values[mark.get(stage, 0):] for stage, values in samples.items()}


class TreeClient:
    """A `serve_rounds` child running the code of `tree`."""

    def __init__(self, tree: Path, peers: int, tokens: int):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(peers), "--tokens", str(tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree,
        )
        line = self.process.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the client child in {tree} did not start (got {line!r})")

    def run(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


class Samples:
    """Every round's samples of one tree and swarm size: the client's and the peers' (all peers pooled)."""

    def __init__(self):
        self.client: dict[str, list[float]] = {}
        self.peer: dict[str, list[float]] = {}
        self.speeds: list[float] = []

    def add(self, result: dict) -> None:
        self.speeds.append(result["tokens_per_s"])
        for stage, values in result["client"].items():
            self.client.setdefault(stage, []).extend(values)
        for peer in result["peers"]:
            for stage, values in peer.items():
                self.peer.setdefault(stage, []).extend(values)


TRIM = 0.05  # share of samples left out at each end of a stage's durations (prefills, the worst preemptions)
ROWS = (  # (label, stage or derivation); a derivation is (label of a row, minus the rows after it)
    ("client: request serialise", "c:request serialise"),
    ("client: round trip (send to reply)", ("c:send + wait", "c:request serialise")),
    ("  stream: hivemind + p2pd, both ways", ("client: round trip (send to reply)", "p:peer step")),
    ("  peer: whole step in the handler", "p:peer step"),
    ("    unpack metadata", "p:unpack metadata"),
    ("    read tensors (deserialise + checks)", "p:read tensors"),
    ("      of which deserialise", "p:deserialise"),
    ("    scheduler (queue + compute thread)", "p:scheduler"),
    ("      run steps: input cast + blocks", "p:run steps"),
    ("        blocks compute", "p:blocks"),
    ("      finish step: cast, to CPU, receipt", "p:finish step"),
    ("        receipt", "p:receipt"),
    ("          digests (in + out)", "p:digest"),
    ("          sign (body, digest, signature)", "p:sign"),
    ("      thread hand-off (derived)", ("p:scheduler", "p:run steps", "p:finish step")),
    ("    reply serialise", "p:reply serialise"),
    ("    other handler work (derived)", ("p:peer step", "p:unpack metadata", "p:read tensors", "p:scheduler",
                                         "p:reply serialise")),
    ("client: read reply (deserialise + checks)", "c:read reply"),
    ("client: verify receipt", "c:verify receipt"),
    ("client: spot-check observer", "c:spot-check observer"),
    ("client: session loop, rest (derived)", ("c:client step / hops", "c:send + wait", "c:read reply",
                                              "c:verify receipt", "c:spot-check observer")),
    ("client step / hops", "c:client step / hops"),
    ("  of which not blocks compute (derived)", ("c:client step / hops", "p:blocks")),
    ("caller thread to client loop, per step", ("c:sync step", "c:client step")),
)


def trimmed_mean(values: list[float]) -> float:
    ordered = sorted(values)
    cut = int(len(ordered) * TRIM)
    return statistics.mean(ordered[cut:len(ordered) - cut] or ordered)


def stage_values(samples: Samples, peers: int, cpu: bool) -> dict[str, float]:
    """Microseconds per hop-step of each measured stage ("c:" client, "p:" peer): trimmed mean per call x calls per
    hop-step (`client step` and `sync step`: per step); with `cpu`, the CPU time of the calling thread instead."""
    suffix = CPU_SUFFIX if cpu else ""
    hop_steps = len(samples.client.get("send + wait", []))
    peer_steps = len(samples.peer.get("peer step", []))
    values: dict[str, float] = {}
    for prefix, source, steps in (("c:", samples.client, hop_steps), ("p:", samples.peer, peer_steps)):
        for stage, durations in source.items():
            if durations and steps and stage.endswith(suffix) and (cpu or not stage.endswith(CPU_SUFFIX)):
                name = stage.removesuffix(suffix)
                per_step = steps if name not in ("client step", "sync step") else len(durations)
                values[prefix + name] = trimmed_mean(durations) * len(durations) / per_step * 1e6
    if "c:client step" in values:
        values["c:client step / hops"] = values["c:client step"] / peers
    return values


def stage_rows(samples: Samples, peers: int, cpu: bool = False) -> list[tuple[str, float | None]]:
    """(row label, microseconds per hop-step) for one tree, in `ROWS` order; None where a stage is missing."""
    values = stage_values(samples, peers, cpu)
    rows: dict[str, float | None] = {}
    for label, source in ROWS:
        if isinstance(source, str):
            rows[label] = values.get(source)
        elif not cpu:
            first, *others = (rows.get(s, values.get(s)) for s in source)
            rows[label] = None if first is None or None in others else first - sum(others)
        else:
            rows[label] = None  # a difference of CPU times means nothing: the derived rows are waits
    return list(rows.items())


def render(peers: int, trees: dict[str, Samples], local_ms: float) -> list[str]:
    names = list(trees)
    lines = [f"{peers} peer(s): microseconds per hop-step (trimmed mean per call x calls per hop-step); "
             f"wall time, then the CPU time of the calling thread"]
    columns = [f"{n} wall" for n in names] + (["change"] if len(names) == 2 else [])
    columns += [f"{n} CPU" for n in names] + (["change"] if len(names) == 2 else [])
    lines.append(f"{'stage':<44}" + "".join(f"{c:>13}" for c in columns))
    lines.append("-" * len(lines[-1]))
    wall = {name: stage_rows(samples, peers) for name, samples in trees.items()}
    cpu = {name: stage_rows(samples, peers, cpu=True) for name, samples in trees.items()}
    for index, (label, _) in enumerate(wall[names[0]]):
        row = f"{label:<44}"
        for table in (wall, cpu):
            values = [table[name][index][1] for name in names]
            row += "".join(f"{'-' if v is None else f'{v:.0f}':>13}" for v in values)
            if len(values) == 2:
                row += f"{'-' if None in values else f'{values[1] - values[0]:+.0f}':>13}"
        lines.append(row)
    lines.append("")
    for name, samples in trees.items():
        speed = statistics.median(samples.speeds)
        per_hop = (1000 / speed - local_ms) / peers
        lines.append(f"{name}: {speed:.2f} tokens/s (rounds: {', '.join(f'{s:.2f}' for s in samples.speeds)}), "
                     f"{1000 / speed:.1f} ms/token, local {local_ms:.1f} ms/token, swarm/local "
                     f"{local_ms * speed / 1000:.3f}x, per hop {per_hop:.2f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="1,3", help="swarm sizes, comma-separated (of 1, 2, 3)")
    parser.add_argument("--baseline", type=Path, help="another tree of the project to compare with, side by side")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return serve_rounds(args.child, args.tokens)

    here = Path(__file__).resolve().parent.parent
    trees = {"this": here}
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        if not (baseline / TIMING_MODULE).exists():
            shutil.copy(here / TIMING_MODULE, baseline / TIMING_MODULE)
        trees = {"baseline": baseline, "this": here}
    local = LocalBaseline(args.tokens)
    output = []
    for peers in (int(p) for p in args.peers.split(",")):
        clients = {name: TreeClient(tree, peers, args.tokens) for name, tree in trees.items()}
        samples = {name: Samples() for name in trees}
        local_runs = []
        try:
            for round_index in range(args.rounds):
                order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
                for name in order:
                    local_runs.append(local.run())
                    samples[name].add(clients[name].run())
                print(f"{peers} peer(s): round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for client in clients.values():
                client.close()
        output += render(peers, samples, 1000 / median_run(local_runs).tokens_per_s) + [""]
    local.close()
    print(f"Hop breakdown, greedy decode, {args.tokens} new tokens per round, {args.rounds} rounds alternating trees "
          f"and the local baseline, {torch.get_num_threads()} torch threads per process, {os.cpu_count()} cores\n")
    print("\n".join(output))


if __name__ == "__main__":
    main()
