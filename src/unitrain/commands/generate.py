"""`unitrain generate`: completions of prompts from a checkpoint, a PEFT adapter or a training run, as JSON lines
and a readable print; `--reference` puts the completion of the model training started from beside each.

Prompts come from `--prompt`, a file (`--prompts`: JSONL strings/messages or text lines) or the pairs a run held
out (`--held-out RUN_DIR`, the pairs `score --held-out` scores). Greedy by default; `--temperature` > 0 samples
(with `--top-p` and `--seed`). Decoding is transformers' `generate` (see unitrain.model.generate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from pathlib import Path

from unitrain.errors import UnitrainError
from unitrain.model.adapter import WEIGHT_DTYPES as DTYPES

HELP = (
    "write completions of prompts from a checkpoint, an adapter or a run (and from the model it started from)"
)
START = "start"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face checkpoint, PEFT adapter directory, training checkpoint, run directory, or Hub id "
        "org/name[@revision]",
    )
    parser.add_argument("--base", help="base checkpoint of an adapter (default: its base_model_name_or_path)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts", help="JSONL (strings, or objects with prompt/messages) or text file, one a line"
    )
    parser.add_argument(
        "--held-out", metavar="RUN_DIR", help="the prompts of the pairs the run in RUN_DIR held out"
    )
    parser.add_argument(
        "--data", help="with --held-out: the dataset (default: the first the run validated on)"
    )
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="plain-text prompts become a user message rendered with the chat template",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    parser.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    parser.add_argument(
        "--reference",
        nargs="?",
        const=START,
        metavar="PATH",
        help="also complete with this model; without PATH, the model the given one started from",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per completion (128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="weights dtype (default float32)"
    )
    parser.add_argument("--output", help="JSON-lines file to write, one object per prompt")
    parser.add_argument(
        "--quiet", action="store_true", help="print only the summary line, not the completions"
    )


def run(args: argparse.Namespace) -> int:
    from unitrain.data.prepare.tokenize import TextTokenizer
    from unitrain.files import resolve_model
    from unitrain.inference.models import model_source
    from unitrain.inference.prompts import encode_prompts, held_out_prompts, read_prompts
    from unitrain.model.generate import Sampling, complete, eos_ids, to_transformers
    from unitrain.train.dist import resolve_device

    started = time.perf_counter()
    if args.batch_size < 1:
        raise UnitrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UnitrainError(f"--limit must be at least 1, got {args.limit}")
    if not (args.prompt or args.prompts or args.held_out):
        raise UnitrainError("no prompts: give --prompt TEXT, --prompts FILE or --held-out RUN_DIR")
    device = resolve_device(args.device, setting="--device ")
    for name in ("model", "base"):
        setattr(args, name, resolve_model(getattr(args, name), f"--{name}"))
    if args.reference not in (None, START):
        args.reference = resolve_model(args.reference, "--reference")
    source = model_source(args.model, args.base)
    reference = None
    if args.reference == START:
        reference = source.start()
        if reference is None:
            raise UnitrainError(
                f"--reference: {args.model} is a plain checkpoint; name the model to compare with"
            )
    elif args.reference is not None:
        reference = model_source(args.reference)
    dataset = None
    prompts = []
    if args.held_out:
        prompts, dataset = held_out_prompts(args.held_out, args.data, None)
    texts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    tokenizer_path = args.tokenizer or source.tokenizer or (dataset.tokenizer_path if dataset else None)
    if tokenizer_path is None:
        raise UnitrainError(f"{args.model}: no tokenizer found with the model; give --tokenizer")
    tokenizer = TextTokenizer(tokenizer_path, args.chat_template)
    prompts = (prompts + encode_prompts(tokenizer, texts, args.chat))[: args.limit]
    if dataset is not None:
        from unitrain.train.compat import check_tokenizer

        for model in (source, reference):
            if model is not None and model.kind != "run":
                check_tokenizer(model.path, [dataset], False, "--tokenizer")
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_ids=eos_ids(tokenizer, source.generation_config),
        pad_id=tokenizer.eos_id,
    )
    sampling.check()
    completions = {}
    for role, model_path in (("model", source), ("reference", reference)):
        if model_path is None:
            continue
        model = to_transformers(model_path.load(DTYPES[args.dtype], device))
        completions[role] = complete(model, [prompt.ids for prompt in prompts], sampling, args.batch_size)
        del model
    rows = [_row(tokenizer, prompt, completions, number) for number, prompt in enumerate(prompts)]
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.partial")  # renamed at the end: never half-written
        partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        partial.replace(output)
    if not args.quiet:
        names = {"model": str(source.path), "reference": str(reference.path) if reference else ""}
        print(side_by_side(rows, names))
    mode = (
        "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature}, top-p {args.top_p})"
    )
    line = f"generated {len(rows):,} completion(s) {mode} in {time.perf_counter() - started:.1f}s"
    print(line + (f"; wrote {args.output}" if args.output else ""))
    return 0


def _row(tokenizer, prompt, completions: dict, number: int) -> dict:
    row = {"number": number, **{k: v for k, v in prompt.source.items() if k != "chosen_ids"}}
    row["prompt_text"] = tokenizer.decode(prompt.ids)
    if "chosen_ids" in prompt.source:
        row["chosen"] = tokenizer.decode(prompt.source["chosen_ids"])
    for role, results in completions.items():
        ids, finish = results[number]
        text_ids = ids[:-1] if finish == "eos" else ids
        row[role] = tokenizer.decode(text_ids)
        row[f"{role}_ids"], row[f"{role}_finish"] = ids, finish
    return row


def side_by_side(rows: list[dict], names: dict[str, str], prompt_chars: int = 400) -> str:
    """Each prompt (its last `prompt_chars` characters), then the completions in columns as wide as the terminal
    allows (one under the other when it is narrow)."""
    width = max(shutil.get_terminal_size((120, 24)).columns, 60)
    blocks = []
    for row in rows:
        prompt = row["prompt_text"]
        prompt = prompt if len(prompt) <= prompt_chars else "…" + prompt[-prompt_chars:]
        where = f" (held-out #{row['index']})" if "index" in row else ""
        lines = [f"=== prompt {row['number'] + 1}{where} " + "=" * 20, prompt.rstrip()]
        roles = [role for role in ("reference", "model") if role in row]
        titles = {"model": f"after: {names['model']}", "reference": f"before: {names['reference']}"}
        if len(roles) == 2 and width >= 80:
            column = (width - 3) // 2
            left, right = (_wrap(f"--- {titles[r]}", row[r], column) for r in roles)
            left += [""] * (len(right) - len(left))
            right += [""] * (len(left) - len(right))
            lines += [f"{a:<{column}} | {b}".rstrip() for a, b in zip(left, right)]
        else:
            for role in roles:
                lines += _wrap(f"--- {titles[role] if len(roles) == 2 else names[role]}", row[role], width)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _wrap(title: str, text: str, width: int) -> list[str]:
    lines = textwrap.wrap(title, width) or [""]
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False) or [""]
    return lines
