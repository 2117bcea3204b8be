"""A whole swarm on this machine: a bootstrap node and three peers (blocks 0:10, 10:20, 20:30 of the
default model), then one question answered through them with `swarm-chat`, then everything stopped.

    python examples/local_swarm.py ["your question"]
"""

import subprocess
import sys
import time

from peers.local import LocalSwarm

QUESTION = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"


def main() -> None:
    began = time.perf_counter()
    with LocalSwarm(model="smollm2-135m") as swarm:
        print(f"bootstrap node: {swarm.initial_peers}", flush=True)
        peers = [swarm.add_peer(blocks, wait=False, name=f"peer-{blocks.replace(':', '-')}") for blocks in ("0:10", "10:20", "20:30")]
        for peer in peers:
            swarm.wait_online(peer)
        print(f"3 peers online after {time.perf_counter() - began:.1f} s (logs in {swarm.log_dir})\n", flush=True)
        subprocess.run([sys.executable, "-m", "peers.cli", "status"], env=swarm.env, check=True)
        print(f"\nQ: {QUESTION}", flush=True)
        answer = subprocess.run([sys.executable, "-m", "apps.chat", "--prompt", QUESTION, "--max-new-tokens", "64"],
                                env=swarm.env, check=True, stdout=subprocess.PIPE, text=True).stdout
        print(f"A: {answer}", end="", flush=True)  # after the chat's progress lines (stderr)
    print("\nswarm stopped: every process it started has exited")


if __name__ == "__main__":
    main()
