"""docs/configuration.md, generated from the config models so that it cannot drift from them
(`python -m unitrain.config_docs docs/configuration.md`; a test fails when the committed file differs).

One Markdown table per section, one row per key: type, default and the field's description. Every cell is kept on
one line with its pipes escaped, so a row never spills into a second one.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from unitrain.config import TrainConfig
from unitrain.config_sections import model_classes


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{arg}`" for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args if arg is not Ellipsis)}]"
    return annotation.__name__


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(section)"
    default = field.default
    if default is None:
        return "`null`"
    # a bare scalar is dumped as a document ending in `...` on a line of its own: one line, without it
    return f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    """Text as one Markdown table cell: on one line, its pipes escaped so they do not open a new cell."""
    return " ".join(text.split()).replace("|", "\\|")


def configuration_markdown() -> str:
    """docs/configuration.md: every key with its type, default and meaning, from the models above."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/unitrain/config.py` by `python -m unitrain.config_docs docs/configuration.md`; "
        "do not edit by hand.",
        "",
        "A run is one YAML file; any key can be overridden on the command line with a dotted path, the value "
        "parsed as YAML: `unitrain train run.yaml dpo.beta=0.2 optimizer.betas=[0.9,0.99]`.",
        "",
    ]
    for name, field in TrainConfig.model_fields.items():
        sections = model_classes(field.annotation)
        if not sections:
            lines += [
                f"## `{name}`",
                "",
                f"{field.description}",
                "",
                f"Type {_type_name(field.annotation)}; {_default_text(field)}.",
                "",
            ]
            continue
        lines += [
            f"## `{name}`",
            "",
            f"{field.description}",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, sub in sections[0].model_fields.items():
            lines.append(
                f"| `{name}.{key}` | {_type_name(sub.annotation)} | {_cell(_default_text(sub))} "
                f"| {_cell(sub.description)} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(configuration_markdown())
