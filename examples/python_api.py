"""Generate text through the swarm from Python, as with a transformers model.

    python examples/python_api.py          # uses $SWARM_INITIAL_PEERS, or starts a local swarm of 3 peers
"""

from peers.local import swarm_or_local
from swarm import DistributedModelForCausalLM

QUESTION = "What is the capital of France?"


def main() -> None:
    with swarm_or_local() as initial_peers:
        with DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[initial_peers]) as model:
            inputs = model.tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            prompt_length = inputs["input_ids"].shape[1]
            output = model.generate(inputs["input_ids"], max_new_tokens=32)  # greedy, like transformers
            print(f"Q: {QUESTION}\nA: {model.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)}")

            # A session keeps the KV caches on the peers, so a continuation sends only the new tokens.
            with model.inference_session(max_length=128) as session:
                first = model.generate(inputs["input_ids"], max_new_tokens=8, session=session)
                more = model.generate(first[:, -1:], max_new_tokens=8, session=session)
                text = model.tokenizer.decode(first[0, prompt_length:].tolist() + more[0, 1:].tolist(),
                                              skip_special_tokens=True)
                print(f"in one session, 8 + 8 tokens: {text}")


if __name__ == "__main__":
    main()
