"""A peer with compression options: here one peer holds all 30 blocks as int8 weights (bitsandbytes),
a quarter of the bytes of float32, and a client asks it a question.

    python examples/compressed_peer.py
"""

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM

# Options given to `swarm-peer join`; others to try: ["--quant", "nf4"], ["--svd-energy", "0.99"],
# ["--offload", "disk"], ["--dtype", "bfloat16"]. See benchmarks/results/compression.txt for what each costs.
PEER_OPTIONS = ["--quant", "int8"]
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
