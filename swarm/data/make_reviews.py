"""Write reviews.jsonl: short product reviews labelled "positive" or "negative", as chat examples.

The user turn is only the review; the assistant answers with the label word alone. The default model does not
answer that way untold, so the share of held-out reviews answered with the right label measures what tuning
taught it (`swarm-tune`). Seeded: running it again writes the same file.

    python swarm/data/make_reviews.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

THINGS = ["headphones", "coffee maker", "backpack", "phone case", "desk lamp", "blender", "keyboard", "running shoes",
          "water bottle", "tent", "novel", "jacket", "vacuum cleaner", "monitor", "kettle", "umbrella", "mattress",
          "camera", "board game", "frying pan", "office chair", "toaster", "bike helmet", "smart watch"]
GOOD = ["works perfectly", "exceeded my expectations", "is sturdy and well made", "was worth every penny",
        "arrived early and works great", "is comfortable and reliable", "looks beautiful", "is a delight to use",
        "still works like new after months", "is the best purchase I made this year"]
BAD = ["broke after two days", "stopped working within a week", "feels cheap and flimsy", "was a waste of money",
       "arrived damaged", "is uncomfortable and noisy", "looks nothing like the photos", "is a pain to use",
       "fell apart after a month", "is the worst purchase I made this year"]
GOOD_ENDINGS = ["I would buy it again.", "Highly recommended.", "My whole family loves it.", "Five stars.",
                "I am very happy with it.", ""]
BAD_ENDINGS = ["I want a refund.", "Do not buy it.", "Very disappointed.", "One star.", "I am returning it.", ""]


def review(rng: random.Random, label: str) -> str:
    thing = rng.choice(THINGS)
    verdict, ending = (rng.choice(GOOD), rng.choice(GOOD_ENDINGS)) if label == "positive" else (
        rng.choice(BAD), rng.choice(BAD_ENDINGS))
    opener = rng.choice(["This", "The", "My new", "The"])
    return f"{opener} {thing} {verdict}. {ending}".strip()


def main(count: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    lines = []
    while len(lines) < count:
        label = rng.choice(["positive", "negative"])
        text = review(rng, label)
        if text in seen:
            continue
        seen.add(text)
        messages = [{"role": "user", "content": f"Review: {text}"}, {"role": "assistant", "content": label}]
        lines.append(json.dumps({"messages": messages}))
    out = Path(__file__).with_name("reviews.jsonl")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} examples to {out}")


if __name__ == "__main__":
    main()
