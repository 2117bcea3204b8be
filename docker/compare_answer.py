"""Compare an answer given through the swarm with the local model's greedy answer to the same chat prompt.

    python docker/compare_answer.py QUESTION MAX_NEW_TOKENS ANSWER_FILE     (exit 1 if they differ)
"""

import sys

import torch

from swarm.models import DEFAULT_MODEL, open_model


def local_answer(question: str, max_new_tokens: int) -> str:
    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer, model = checkpoint.load_tokenizer(), checkpoint.load_causal_lm(torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    question, max_new_tokens, answer_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    through_swarm = open(answer_file).read().strip()
    local = local_answer(question, max_new_tokens)
    print(f"local model: {local!r}\nswarm:       {through_swarm!r}")
    if local != through_swarm:
        sys.exit("MISMATCH: the swarm's answer differs from the local model's")
    print("the answers are equal")


if __name__ == "__main__":
    main()
