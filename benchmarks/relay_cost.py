"""Per-token cost of a relayed hop against a direct one, side by side in one run, through a real NAT.

A NAT lab (peers.natlab, needs root): outside, a bootstrap node (the relay) and peer `direct` serving blocks 0:30;
at home, behind the MASQUERADE router, peer `home` serving 0:30, which nobody can dial and which clients reach
through the bootstrap node. The client (outside) opens one inference stream per peer and sends a 16-token prompt,
then single-token steps of hidden states; a step's time is one token's cost of the hop (the round trip, plus the
relay's forwarding for `home`, plus the same 30 blocks of compute on either peer). Direct and relayed rounds
alternate so both see the same machine load; medians and 90th percentiles over all steps are reported, with the
median round trip of an `info` call to each peer.

    sudo python benchmarks/relay_cost.py [--steps 128] [--rounds 3]     # prints the table and writes
                                                                         # benchmarks/results/relay_cost.txt
"""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp

prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from peers import natlab  # noqa: E402
from peers.local import LocalSwarm  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402
from swarm.protocol import StepRequest  # noqa: E402
from swarm.routing import RELAY_PENALTY  # noqa: E402

PROMPT = 16
RESULTS = Path(__file__).parent / "results" / "relay_cost.txt"


async def one_round(model: DistributedModelForCausalLM, peer_id, hidden_size: int, blocks: int, steps: int) -> list[float]:
    """Seconds of each single-token step through one stream to `peer_id` (relayed if it announced relays)."""
    stream = model.transport.open_stream(peer_id)
    session, times = uuid.uuid4().hex, []
    try:
        meta = StepRequest(session_id=session, start=0, end=blocks, position=0, max_length=PROMPT + steps)
        await stream.step(meta, torch.randn(1, PROMPT, hidden_size), timeout=120)
        for position in range(PROMPT, PROMPT + steps):
            meta = StepRequest(session_id=session, start=0, end=blocks, position=position, max_length=PROMPT + steps)
            began = time.perf_counter()
            await stream.step(meta, torch.randn(1, 1, hidden_size), timeout=120)
            times.append(time.perf_counter() - began)
    finally:
        await stream.close()
    return times


async def pings(model: DistributedModelForCausalLM, peer_id, count: int = 20) -> list[float]:
    return [(await model.transport.info(peer_id, timeout=10))[1] for _ in range(count)]


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def measure(steps: int, rounds: int) -> str:
    checkpoint = open_model(DEFAULT_MODEL)
    config = checkpoint.load_config()
    blocks = checkpoint.num_blocks
    with natlab.NatLab() as lab, LocalSwarm(model=DEFAULT_MODEL, host="0.0.0.0",
                                            launcher=tuple(lab.command(lab.outside))) as swarm:
        direct = swarm.add_peer(f"0:{blocks}", name="direct", wait=False)
        home = swarm.add_peer(f"0:{blocks}", name="home", wait=False, launcher=lab.command(lab.home))
        for peer in (direct, home):
            swarm.wait_online(peer)
        model = natlab.call_in_namespace(lab.outside, lambda: DistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, [swarm.initial_peers], spot_checks=False))
        try:
            spans = {str(s.peer_id): s for s in model.loop.run(model.sequence.refresh_spans(force=True))}
            ids = {"direct": spans[direct.peer_id].peer_id, "relayed": spans[home.peer_id].peer_id}
            assert spans[home.peer_id].info.relays == [swarm.processes[0].peer_id], "home is not relayed"
            step_times: dict[str, list[float]] = {"direct": [], "relayed": []}
            rtts: dict[str, list[float]] = {"direct": [], "relayed": []}
            for mode, peer_id in ids.items():  # warm both paths up (connections, first-call costs)
                model.loop.run(one_round(model, peer_id, config.hidden_size, blocks, 8), timeout=300)
            for _ in range(rounds):
                for mode, peer_id in ids.items():
                    step_times[mode] += model.loop.run(one_round(model, peer_id, config.hidden_size, blocks, steps),
                                                       timeout=600)
                    rtts[mode] += model.loop.run(pings(model, peer_id), timeout=300)
        finally:
            model.shutdown()
    return render(step_times, rtts, steps, rounds, blocks)


def render(step_times: dict[str, list[float]], rtts: dict[str, list[float]], steps: int, rounds: int, blocks: int) -> str:
    direct = statistics.median(step_times["direct"])
    lines = [
        f"one hop of blocks 0:{blocks} of {DEFAULT_MODEL} (float32, CPU), {rounds} alternating rounds x {steps} "
        f"single-token steps after a {PROMPT}-token prompt; client and relay outside, `home` behind NAT",
        f"{'hop':<28}{'per token (median)':>20}{'p90':>10}{'ping (median)':>16}{'vs direct':>12}",
        "-" * 86,
    ]
    labels = {"direct": "direct (dialled)", "relayed": "relayed (through bootstrap)"}
    for mode in ("direct", "relayed"):
        median = statistics.median(step_times[mode])
        lines.append(f"{labels[mode]:<28}{median * 1000:>17.2f} ms{p90(step_times[mode]) * 1000:>7.2f} ms"
                     f"{statistics.median(rtts[mode]) * 1000:>13.2f} ms{median / direct:>11.2f}x")
    extra = statistics.median(step_times["relayed"]) - direct
    lines.append(f"a relayed hop costs {extra * 1000:+.2f} ms per token over a direct one "
                 f"(routing adds {RELAY_PENALTY * 1000:.0f} ms to a relayed hop: swarm.routing.RELAY_PENALTY)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = natlab.unavailable()
    if reason is not None:
        sys.exit(f"relay_cost needs network namespaces: {reason}")
    table = measure(args.steps, args.rounds)
    print(table)
    RESULTS.write_text(table + "\n")
    print(f"(saved to {RESULTS})")


if __name__ == "__main__":
    main()
