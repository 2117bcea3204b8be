"""Train soft prompts through the swarm (prompt tuning), then chat with them.

The peers run the frozen blocks forward and backward; the prompts, the token ids, the labels and the loss stay
here. The task is the shipped product reviews (swarm/data/reviews.jsonl): answer a review with its label alone.

    python examples/finetune.py [STEPS]     # uses $SWARM_INITIAL_PEERS, or starts a local swarm of 3 peers
"""

import sys
import tempfile

from peers.local import swarm_or_local
from swarm import DistributedModelForCausalLM
from swarm.finetune import DEFAULT_DATA, accuracy, load_examples, split, train

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
BATCH = 8


def main() -> None:
    training, held_out = split(load_examples(DEFAULT_DATA), held_out=0.2)
    training, held_out = training[: STEPS * BATCH], held_out[:24]
    with swarm_or_local() as initial_peers:
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[initial_peers],
                                                            tuning="prompt", prompt_length=16, spot_checks=False)
        with model:
            print(f"held-out accuracy before: {accuracy(model, held_out):.0%}")
            log = train(model, training, epochs=1, batch_size=BATCH, lr=0.03,
                        on_step=lambda step, loss: print(f"step {step}: loss {loss:.3f}", flush=True))
            print(f"held-out accuracy after {len(log.losses)} steps: {accuracy(model, held_out):.0%}")
            saved = model.save_prompts(tempfile.mkdtemp(prefix="prompts-"))
            print(f"saved to {saved}")

        # the saved prompts, loaded into a new client, as `swarm-chat --prompts DIR` does
        with DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[initial_peers],
                                                         prompts=saved) as tuned:
            review = "Review: The blender is loud, leaks everywhere and the lid cracked."
            ids = tuned.tokenizer.apply_chat_template([{"role": "user", "content": review}],
                                                      add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            answer = tuned.generate(ids, max_new_tokens=4)[0, ids.shape[1]:]
            print(f"{review}\nA: {tuned.tokenizer.decode(answer, skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
