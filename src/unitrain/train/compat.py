"""Whether a model and a dataset belong together, checked before any forward pass: the model's vocabulary holds
every id of the dataset, and a checkpoint that ships a tokenizer ships the one the data was prepared with.

Token ids mean nothing without their tokenizer: a model scored or trained on ids of another tokenizer runs
without complaint and reports meaningless numbers. The dataset records the SHA-256 of the `tokenizer.json` it
was prepared with (under the file's own name, which `tokenizer_file_name` finds whatever it was); a checkpoint's
`tokenizer.json` with another hash is compared by content (its vocabulary and added tokens: what an id means),
so a tokenizer saved again with other formatting still matches. Trade-off: a
checkpoint without a `tokenizer.json`, or a dataset without a recorded one, cannot be checked and is accepted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from unitrain.errors import UnitrainError


def check_vocab_size(model_vocab_size: int, dataset_vocab_size: int, model_name: str | Path) -> None:
    """Refuse a model whose embedding has fewer rows than the dataset's vocabulary (ids would index past it)."""
    if model_vocab_size < dataset_vocab_size:
        raise UnitrainError(
            f"{model_name}: model vocab_size {model_vocab_size} is smaller than the dataset's {dataset_vocab_size}"
        )


def _token_meanings(path: Path) -> tuple | None:
    """What each id of a `tokenizer.json` stands for: its model's vocabulary and its added tokens."""
    try:
        content = json.loads(path.read_text())
        added = sorted((token["id"], token["content"]) for token in content.get("added_tokens") or ())
        return json.dumps(content["model"].get("vocab"), sort_keys=True), added
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# files beside a tokenizer that are not the tokenizer itself
TOKENIZER_SIDE_FILES = {
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "config.json",
    "generation_config.json",
}


def tokenizer_file_name(names) -> str | None:
    """Which of a dataset's recorded tokenizer files is the `tokenizer.json`, whatever it was called when the
    data was prepared (`prepare --tokenizer my-tokenizer.json` records it under its own name)."""
    names = list(names)
    if "tokenizer.json" in names:
        return "tokenizer.json"
    candidates = [name for name in names if name.endswith(".json") and name not in TOKENIZER_SIDE_FILES]
    return candidates[0] if len(candidates) == 1 else None


def tokenizer_mismatch(model_dir: str | Path, dataset) -> str | None:
    """Why the tokenizer in `model_dir` is not the one `dataset` was prepared with; None when it is (or when
    either side has no `tokenizer.json` to compare)."""
    hashes = dataset.metadata.get("tokenizer", {}).get("files_sha256", {})
    name = tokenizer_file_name(hashes)
    recorded = None if name is None else hashes[name]
    theirs = Path(model_dir) / "tokenizer.json"
    if recorded is None or not theirs.is_file():
        return None
    digest = hashlib.sha256(theirs.read_bytes()).hexdigest()
    if digest == recorded:
        return None
    ours = dataset.tokenizer_path / name if dataset.tokenizer_path is not None else None
    if ours is not None and ours.is_file():
        meaning = _token_meanings(ours)
        if meaning is not None and meaning == _token_meanings(theirs):
            return None
    return (
        f"{theirs} (sha256 {digest[:12]}) is not the tokenizer {dataset.path} was prepared with "
        f"(sha256 {recorded[:12]}): its token ids mean other tokens to this model"
    )


def check_tokenizer(model_dir: str | Path, datasets, allowed: bool, override: str) -> None:
    """Refuse (one line naming both and the `override` that allows it) a checkpoint whose tokenizer differs from
    the one any of `datasets` was prepared with, unless `allowed`."""
    if allowed:
        return
    for dataset in datasets:
        reason = tokenizer_mismatch(model_dir, dataset)
        if reason is not None:
            raise UnitrainError(
                f"{reason}; prepare the data with the model's tokenizer, or pass {override} if you know the two "
                "tokenizers agree"
            )
