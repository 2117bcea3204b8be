"""A peer with its own serving options: here one peer holds all 30 blocks in bfloat16, half the memory of
float32, and a client asks it a question.

    python examples/compressed_peer.py
"""

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM

# Options given to `swarm-peer join`. Compression options (quantisation, low-rank factorisation,
# weight offloading) go here too.
PEER_OPTIONS = ["--dtype", "bfloat16"]
QUESTION = "What is the capital of France?"


def main() -> None:
    with LocalSwarm(model="smollm2-135m") as swarm:
        peer = swarm.add_peer("0:30", *PEER_OPTIONS)
        print(f"peer {peer.peer_id} serves blocks 0:30 with {' '.join(PEER_OPTIONS)}")
        with DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[swarm.initial_peers]) as model:
            ids = model.tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            output = model.generate(ids, max_new_tokens=32)
            print(f"Q: {QUESTION}\nA: {model.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
