"""Write examples/data/chat.jsonl: 400 small, deterministic chat conversations (arithmetic, word facts).

    python examples/data/make_chat.py [OUT]

Each line is `{"messages": [{"role": ..., "content": ...}, ...]}` with a system prompt, one or two
user turns and the assistant's answers, the format `data.format=chat` reads.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = ["python", "tensor", "latent", "pipeline", "gradient", "optimizer", "attention", "shard"]


def conversation(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    word = rng.choice(WORDS)
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    messages += [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    if rng.random() < 0.5:
        messages += [
            {"role": "user", "content": f"How many letters are in the word '{word}'?"},
            {"role": "assistant", "content": f"'{word}' has {len(word)} letters."},
        ]
    return {"messages": messages}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("chat.jsonl")
    rng = random.Random(0)
    out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(400)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
