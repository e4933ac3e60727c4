"""Preference data labelled by a simple rule, for reward-model training tests:
the response with more '!' is preferred."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "the quick brown fox jumps over lazy dog good answer short kind correct love movie great sunny weather".split()
PROMPTS = ["Say something.", "Tell me about the weather.", "What do you think?", "Describe a fox.", "Give an answer."]


def _sentence(rng: random.Random, bangs: int) -> str:
    words = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
    return words + ("!" * bangs if bangs else ".")


def rule_rows(n: int, seed: int = 0, rankings_every: int = 0) -> list[dict]:
    """``n`` rows: pairs, and every ``rankings_every``-th row a K=3 ranking
    (given shuffled, with ``ranking`` listing indices best first)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = rng.choice(PROMPTS)
        if rankings_every and i % rankings_every == 0:
            bangs = rng.sample([0, 1, 2, 3], 3)
            responses = [_sentence(rng, b) for b in bangs]
            ranking = sorted(range(3), key=lambda j: -bangs[j])
            rows.append({"prompt": prompt, "responses": responses, "ranking": ranking})
            continue
        more, fewer = sorted(rng.sample([0, 1, 2, 3], 2), reverse=True)
        rows.append({"prompt": prompt, "chosen": _sentence(rng, more), "rejected": _sentence(rng, fewer)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
