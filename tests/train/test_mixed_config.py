"""Config of a mixed run: per-dataset objectives and sampling weights, run-level loss weights, and the
single-objective configs that must keep their meaning."""

from __future__ import annotations

import pytest

from unitrain.config import parse_config
from unitrain.errors import UnitrainError

BASE = {
    "model": {
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    },
    "train": {"max_steps": 3},
}
MIXED = [{"path": "pairs", "objective": "dpo"}, {"path": "text", "objective": "pretrain", "weight": 3}]


def config(**raw):
    return parse_config({**BASE, **raw})


def test_a_single_objective_config_is_not_mixed():
    for raw in (
        {"objective": "sft", "data": {"train": "x"}},
        {"objective": "dpo", "data": {"train": [{"path": "a"}, {"path": "b", "weight": 2}]}},
        {"data": {"train": [{"path": "a", "objective": "dpo"}]}},
    ):
        parsed = config(**raw)
        assert not parsed.mixed and parsed.run_objective == parsed.objective


def test_mixed_loss_weights_default_to_one_and_zero_leaves_an_objective_out():
    parsed = config(data={"train": MIXED})
    assert parsed.mixed and parsed.loss_weights == {"pretrain": 1.0, "dpo": 1.0}
    assert parsed.source_objectives == ["dpo", "pretrain"]
    parsed = config(data={"train": MIXED}, objectives={"dpo": 1.0, "pretrain": 0.1})
    assert parsed.loss_weights == {"pretrain": 0.1, "dpo": 1.0}
    parsed = config(data={"train": MIXED}, objectives={"pretrain": 0})
    assert not parsed.mixed and parsed.run_objective == parsed.objective == "dpo"
    parsed = config(data={"train": MIXED[:1]}, objectives={"dpo": 0.5})  # one objective, weighted: mixed path
    assert parsed.mixed and parsed.loss_weights == {"dpo": 0.5}


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"data": {"train": "x"}}, r"data.train\[0\] needs an objective"),
        (
            {"objective": "sft", "data": {"train": "x"}, "objectives": {"dpo": 1}},
            "objectives.dpo: no data.train",
        ),
        ({"data": {"train": MIXED}, "objectives": {"dpo": -1}}, "must be >= 0"),
        ({"data": {"train": MIXED}, "objectives": {"dpo": 0, "pretrain": 0}}, "nothing would train"),
        ({"data": {"train": MIXED}, "packing": {"mode": "pair"}}, "packing.mode must be packed"),
        ({"data": {"train": MIXED, "validation": "v"}}, "list of"),
        (
            {"data": {"train": MIXED, "validation": [{"name": "a", "path": "v"}]}},
            r"validation\[0\] needs an objective",
        ),
        ({"objective": "pretrain", "data": {"train": "x"}, "dpo": {"beta": 0.2}}, "dpo settings are given"),
    ],
)
def test_contradictions_are_refused_in_one_line(raw, message):
    with pytest.raises(UnitrainError, match=message) as error:
        config(**raw)
    assert "\n" not in str(error.value).strip()


def test_validation_sets_need_distinct_names():
    sets = [{"name": "a", "path": "v", "objective": "dpo"}] * 2
    with pytest.raises(UnitrainError, match="distinct names"):
        config(data={"train": MIXED, "validation": sets})
    parsed = config(data={"train": MIXED, "validation": sets[:1]})
    assert parsed.data.validation[0].name == "a"
