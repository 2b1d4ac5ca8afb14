"""Config loading: YAML + dotted overrides, unknown-key suggestions, contradictions, generated docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from unitrain.config import config_to_yaml, load_config, parse_config
from unitrain.config_docs import configuration_markdown
from unitrain.config_sections import PackingSection
from unitrain.errors import UnitrainError

REPO = Path(__file__).resolve().parents[2]


def base(**sections) -> dict:
    raw = {
        "objective": "sft",
        "model": {"config": {"hidden_size": 32}},
        "data": {"train": "data/sft"},
        "train": {"max_steps": 10},
    }
    raw.update(sections)
    return raw


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_overrides_parse_yaml_values_in_order(tmp_path):
    path = write(tmp_path, base())
    config = load_config(
        path,
        [
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.8, 0.99]",
            "run.eval_every=5",
            "optimizer.lr=1e-3",
            "data.validation=0.1",
            "model.config.num_hidden_layers=2",
        ],
    )
    assert config.optimizer.lr == 1e-3  # later override wins
    assert config.optimizer.betas == (0.8, 0.99)
    assert config.run.eval_every == 5
    assert config.data.validation == 0.1
    assert config.model.config == {"hidden_size": 32, "num_hidden_layers": 2}  # free-form mapping extended


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optimizer.weight_decai=0.1",
            "unknown key 'optimizer.weight_decai' (did you mean 'optimizer.weight_decay'",
        ),
        ("trian.seed=1", "unknown key 'trian' (did you mean 'train'"),
        ("batch.micro_batch=4", "did you mean 'batch.micro_batch_size'"),
    ],
)
def test_unknown_key_suggests_closest(tmp_path, override, expected):
    with pytest.raises(UnitrainError, match=None) as error:
        load_config(write(tmp_path, base()), [override])
    assert expected in str(error.value)
    assert str(error.value).startswith(f"command line override '{override}': unknown key")
    assert "\n" not in str(error.value)


def test_an_unknown_model_config_key_is_refused_with_the_closest_one(tmp_path):
    """A typo in the free-form architecture mapping would train a default-sized model and export the typo."""
    override = "model.config.num_hiden_layers=2"
    with pytest.raises(UnitrainError) as error:
        load_config(write(tmp_path, base()), [override])
    assert str(error.value) == (
        f"command line override '{override}': unknown key 'model.config.num_hiden_layers' "
        "(did you mean 'model.config.num_hidden_layers'?)"
    )
    with pytest.raises(UnitrainError, match=r"unknown key 'model.config.zzz' \(valid: architectures, "):
        parse_config(base(model={"config": {"hidden_size": 32, "zzz": 1}}))
    assert parse_config(base(model={"config": {"hidden_size": 32, "rope_theta": 1e4}})).model.config
    # the transformers backend takes any key of its architecture's config class
    neox = {"architectures": ["GPTNeoXForCausalLM"], "rotary_pct": 0.25}
    assert parse_config(base(model={"config": neox})).model.config == neox
    llama = {"hidden_size": 32, "attention_dropout": 0.1}
    assert parse_config(base(model={"config": llama, "backend": "transformers"})).model.config == llama
    with pytest.raises(UnitrainError, match="unknown key 'model.config.attention_dropout'"):
        parse_config(base(model={"config": llama, "backend": "native"}))


def test_a_negative_blend_weight_says_so(tmp_path):
    raw = base(data={"train": [{"path": "a", "weight": 2.0}, {"path": "b", "weight": -1}]})
    with pytest.raises(UnitrainError) as error:
        load_config(write(tmp_path, raw))
    assert str(error.value) == f"{tmp_path / 'run.yaml'}: data.train.1.weight: weight must be > 0, got -1.0"
    with pytest.raises(UnitrainError, match=r"^config: data.train: Input should be a valid string$"):
        parse_config(base(data={"train": 5}))  # neither member of the union: the first one's complaint


def test_a_peft_adapter_directory_as_model_path_points_to_lora_adapter(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UnitrainError) as error:
        parse_config(base(model={"path": str(tmp_path / "adapter")}))
    assert str(error.value).startswith(
        f"config: model.path {tmp_path / 'adapter'} is a PEFT adapter directory, not a checkpoint: use "
        f"lora.adapter={tmp_path / 'adapter'} (with lora.rank"
    )
    assert "\n" not in str(error.value)


def test_unknown_key_inside_blend_list():
    raw = base(data={"train": [{"path": "a", "weight": 2.0}, {"pth": "b"}]})
    with pytest.raises(UnitrainError, match=r"unknown key 'data.train.pth' \(did you mean 'data.train.path'"):
        parse_config(raw)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train": {"max_steps": 10, "epochs": 1}}, "exactly one of train.max_steps and train.epochs"),
        ({"train": {}}, "exactly one of train.max_steps and train.epochs"),
        ({"model": {"path": "x", "config": {"hidden_size": 8}}}, "exactly one of model.path"),
        ({"dpo": {"beta": 0.2}}, "dpo settings are given but objective is sft"),
        ({"packing": {"mode": "pair"}}, "packing.mode and packing.share_prompt only apply to objective dpo"),
        ({"schedule": {"warmup_steps": 10}}, "warmup_steps (10) must be below train.max_steps (10)"),
        ({"data": {"train": "d", "validation": 1.5}}, "fraction must be in (0, 1)"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr: Input should be greater than 0"),
        (
            {"optimizer": {"betas": [0.9, 1.5]}},
            "optimizer.betas: both betas must be in [0, 1), got [0.9, 1.5]",
        ),
        (
            {"train": {"max_steps": 10, "dtype": "float16"}},
            "train.dtype: Input should be 'float32' or 'bfloat16'",
        ),
    ],
)
def test_contradictions_refused_with_reason(changes, message):
    with pytest.raises(UnitrainError) as error:
        parse_config(base(**changes), source="run.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("run.yaml: ")


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_dumped_config_loads_back_equal(objective):
    config = parse_config(
        base(objective=objective, data={"train": [{"path": "a", "weight": 2.0}], "validation": 0.1})
    )
    assert parse_config(yaml.safe_load(config_to_yaml(config))) == config


def test_dpo_loss_contradictions_come_from_the_loss_config():
    raw = base(objective="dpo", dpo={"loss": ["sigmoid", "ipo"], "loss_weights": [1.0]})
    with pytest.raises(UnitrainError) as error:
        parse_config(raw, source="run.yaml")
    assert str(error.value).startswith("run.yaml: ")
    assert "dpo: 1 loss weights for 2 losses" in str(error.value)
    assert "\n" not in str(error.value)


def test_dpo_loss_constants_reach_the_loss_config():
    dpo = {"loss": ["exo_pair", "simpo", "discopop"], "loss_weights": [1.0, 0.5, 0.25]}
    dpo.update(label_smoothing=0.3, simpo_gamma=1.5, discopop_tau=0.2)
    loss_config = parse_config(base(objective="dpo", dpo=dpo), source="run.yaml").preference_loss_config()
    assert (loss_config.losses, loss_config.weights) == (dpo["loss"], dpo["loss_weights"])
    assert (loss_config.label_smoothing, loss_config.simpo_gamma, loss_config.discopop_tau) == (0.3, 1.5, 0.2)
    # EXO's ε may reach 0.5 and beyond; only the losses that flip preferences there refuse it
    parse_config(base(objective="dpo", dpo={"loss": "exo_pair", "label_smoothing": 0.7}), source="run.yaml")
    with pytest.raises(UnitrainError, match="sigmoid needs 0 ≤ label_smoothing < 0.5"):
        parse_config(base(objective="dpo", dpo={"label_smoothing": 0.7}), source="run.yaml")


def test_bad_override_syntax_and_yaml(tmp_path):
    path = write(tmp_path, base())
    with pytest.raises(UnitrainError, match="expected key=value"):
        load_config(path, ["optimizer.lr"])
    with pytest.raises(UnitrainError, match="'lr' is not a section"):
        load_config(path, ["optimizer.lr=1", "optimizer.lr.x=2"])
    (tmp_path / "bad.yaml").write_text("objective: [unclosed")
    with pytest.raises(UnitrainError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_committed_configs_are_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)


def test_the_docs_say_what_paths_mean_and_what_a_long_pair_becomes():
    """The behaviour the docs describe: a pair longer than a row is split (tests/preference/test_packing.py), paths
    resolve against the current directory, the forms model.path takes, and the real-model example with its
    learning-rate guidance."""
    training = (REPO / "docs" / "training.md").read_text()
    description = PackingSection.model_fields["sequence_length"].description
    assert (
        "pair or group is split over a wide row" in description
        and "documents/pairs are dropped" not in description
    )
    assert "a relative path resolves against the current directory" in training
    assert "`model.path` is a local Hugging Face checkpoint directory" in training
    example = REPO / "configs" / "smollm2-135m-lora-sft-cpu.yaml"
    config = load_config(example)
    assert (
        config.model.path == "models/SmolLM2-135M-Instruct"
        and config.lora.rank
        and config.optimizer.lr == 2e-4
    )
    assert (
        f"`configs/{example.name}`" in training
        and "| LoRA adapters (`lora.rank` 8-16) | 1e-4 to 3e-4 |" in training
    )


def test_configuration_doc_is_up_to_date():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == configuration_markdown(), (
        "regenerate: python -m unitrain.config_docs docs/configuration.md"
    )
    for key in (
        "dpo.reference_model",
        "packing.share_prompt",
        "batch.gradient_accumulation_steps",
        "run.keep_last",
    ):
        assert f"`{key}`" in committed


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from unitrain.cli import main

    path = write(tmp_path, base(dpo={"beta": 0.2}))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: dpo settings are given but objective is sft\n"


@pytest.mark.parametrize(
    "file_changes, overrides, blamed, message",
    [
        ({}, ["dpo.beta=0.2"], "command line override 'dpo.beta=0.2'", "dpo settings are given"),
        (
            {},
            ["run.log_every=5", "optimizer.lr=-1"],
            "command line override 'optimizer.lr=-1'",
            "optimizer.lr:",
        ),
        ({}, ["train.epochs=1"], "command line override 'train.epochs=1'", "exactly one of train.max_steps"),
        ({}, ["optimizer.lr"], "command line override 'optimizer.lr'", "expected key=value"),
        # the file's own mistake is still the file's, whatever the command line adds
        ({"optimizer": {"lr": -1}}, ["run.log_every=5"], "{path}", "optimizer.lr:"),
        ({"optimizer": {"lr": -1}}, ["optimizer.lr=2"], None, None),  # the command line fixes the file
    ],
)
def test_errors_of_command_line_overrides_name_the_command_line(
    tmp_path, file_changes, overrides, blamed, message
):
    path = write(tmp_path, base(**file_changes))
    if blamed is None:
        assert load_config(path, overrides).optimizer.lr == 2
        return
    with pytest.raises(UnitrainError) as error:
        load_config(path, overrides)
    assert str(error.value).startswith(blamed.format(path=path) + ": ")
    assert message in str(error.value)


def _cells(row: str) -> int:
    """Cells of a Markdown table row: pipes not escaped as `\\|`, less the outer two, plus one."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


def test_configuration_doc_rows_are_one_table_row_each(monkeypatch):
    from unitrain.config import PackingSection

    # a description with a pipe and a line break must not split its row either
    monkeypatch.setattr(PackingSection.model_fields["mode"], "description", "either a | b\nor c")
    lines = configuration_markdown().splitlines()
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) > 40
    assert {_cells(row) for row in rows} == {4}
    # every line of a table is a row: nothing spills onto a line of its own
    for before, line, after in zip(lines, lines[1:], lines[2:]):
        if before.startswith("|") and after.startswith("|"):
            assert line.startswith("|"), line
    assert "| `packing.mode` | `separate` \\| `pair` \\| `packed` | `packed` | either a \\| b or c |" in rows
