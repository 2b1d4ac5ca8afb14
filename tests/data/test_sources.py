"""The implicit-prompt rule against a naive character-by-character shared prefix."""

from __future__ import annotations

import random

import pytest

from unitrain.data.rows.schemas import ASSISTANT_MARKER, implicit_prompt


def naive_cut(chosen: str, rejected: str) -> int:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prefix = chosen[:shared]
    if ASSISTANT_MARKER in prefix:
        return prefix.rindex(ASSISTANT_MARKER) + len(ASSISTANT_MARKER)
    return max(prefix.rfind(" "), prefix.rfind("\n"), 0)


def test_matches_naive_rule_on_random_dialogues():
    rng = random.Random(0)
    words = ["\n\nHuman:", "\n\nAssistant:", " yes", " no", " maybe", "\n", " x", "y"]
    for _ in range(2000):
        common = "".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        chosen = common + "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
        rejected = common + "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
        assert implicit_prompt(chosen, rejected) == naive_cut(chosen, rejected), (chosen, rejected)


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        (
            "\n\nHuman: hi\n\nAssistant: Yes",
            "\n\nHuman: hi\n\nAssistant: Yeah",
            "\n\nHuman: hi\n\nAssistant:",
        ),
        ("A is Paris.", "A is Lyon.", "A is"),
        ("same", "same", ""),
        ("abc", "xyz", ""),
    ],
)
def test_examples(chosen, rejected, prompt):
    assert chosen[: implicit_prompt(chosen, rejected)] == prompt
