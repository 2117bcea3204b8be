"""Where a decode step's hop time goes: wraps the functions a step passes through, in place, and keeps how long
each call took (for `benchmarks/hop_breakdown.py` only; production code never imports this).

A peer runs under it as `python -m peers.testing.hop_timing --out FILE -- python -m peers.cli join ...`
(a `LocalSwarm` launcher prefix); every second it writes its samples to FILE as JSON. A client process calls
`install(CLIENT_STAGES)` and reads `CLOCK` itself. A plain function's stage also keeps the CPU time its thread
spent in the call (as "<stage> cpu"): on a busy machine that is what the code costs, the wall time what it took.
Each wrapper costs a microsecond or two per call.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import runpy
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

# (stage name, module, attribute path) of what a peer does for one step, outermost first
PEER_STAGES = (
    ("peer step", "peers.handler", "BlockHandler._step"),  # the handler's whole work on one request
    ("unpack metadata", "swarm.protocol", "unpack"),
    ("read tensors", "peers.handler", "BlockHandler._read_tensors"),  # deserialise + shape/finite checks
    ("deserialise", "swarm.protocol", "deserialize_tensors"),
    ("scheduler", "peers.batching", "StepScheduler.submit"),  # queue, thread hand-offs, compute, finish
    ("run steps", "peers.handler", "BlockHandler._run_steps"),  # input cast + blocks
    ("blocks", "swarm.blocks", "BlockSpan.forward"),
    ("finish step", "peers.handler", "BlockHandler._finish_step"),  # cast, transform, to CPU, receipt
    ("receipt", "peers.receipts", "ReceiptSigner.sign"),
    ("digest", "peers.receipts", "tensor_digest"),
    ("sign", "reputation.attest", "Receipt.sign"),  # canonical body, its digest and the signature
    ("reply serialise", "swarm.protocol", "make_reply"),
)

# the same for a client process, per hop of a step
CLIENT_STAGES = (
    ("client step", "swarm.session", "InferenceSession.step"),  # every hop of one step, on the client's loop
    ("sync step", "swarm.client", "SyncSession.step"),  # the same seen from the caller's thread
    ("request serialise", "swarm.protocol", "make_request"),
    ("send + wait", "swarm.remote", "InferenceStream.send"),  # serialise, then the round trip
    ("read reply", "swarm.remote", "read_reply"),  # deserialise + checks
    ("verify receipt", "reputation.client", "ClientTrust.verify"),
    ("spot-check observer", "reputation.checks", "SpotChecker.on_step"),
)


class Clock:
    """Durations of calls, in seconds, per stage name (appended from any thread)."""

    def __init__(self):
        self.samples: dict[str, list[float]] = defaultdict(list)

    def snapshot(self) -> dict[str, int]:
        """How many samples each stage holds now (to take only later ones with `since`)."""
        return {stage: len(values) for stage, values in self.samples.items()}

    def since(self, mark: dict[str, int]) -> dict[str, list[float]]:
        return {stage: values[mark.get(stage, 0):] for stage, values in list(self.samples.items())}


CLOCK = Clock()
CPU = " cpu"  # suffix of the stage names that hold CPU times


def _timed(function: Callable, samples: list[float], cpu: list[float]) -> Callable:
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def timed_async(*args, **kwargs):
            began = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                samples.append(time.perf_counter() - began)
        return timed_async

    @functools.wraps(function)
    def timed(*args, **kwargs):
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            samples.append(time.perf_counter() - began)
            cpu.append(time.thread_time() - began_cpu)
    return timed


def install(stages: tuple[tuple[str, str, str], ...], clock: Clock = CLOCK) -> None:
    """Wrap each stage's function where it is looked up (a class attribute, or a module global); a stage this
    code does not have (an older tree's) is left out."""
    for stage, module_name, path in stages:
        __import__(module_name)
        owner = sys.modules[module_name]
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        setattr(owner, name, _timed(getattr(owner, name), clock.samples[stage], clock.samples[stage + CPU]))


def _write_periodically(path: Path, clock: Clock, period: float = 1.0) -> None:
    while True:
        time.sleep(period)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(clock.since({})))
        os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a peer with its step stages timed.")
    parser.add_argument("--out", type=Path, required=True, help="JSON file the samples are written to each second")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- python -m peers.cli join ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[1:3] != ["-m", "peers.cli"]:
        parser.error(f"expected `-- python -m peers.cli ...`, got {command[:3]}")
    from swarm.runtime import prefer_passive_openmp

    prefer_passive_openmp()  # as peers.cli does, before the stages' modules load torch
    install(PEER_STAGES)
    threading.Thread(target=_write_periodically, args=(args.out, CLOCK), daemon=True, name="hop-timing").start()
    sys.argv = ["peers.cli", *command[3:]]
    runpy.run_module("peers.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
