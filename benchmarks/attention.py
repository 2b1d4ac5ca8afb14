"""Forward + backward time on packed rows per attention backend (dense mask vs per-document blocks): the whole
decoder, and the attention op of one layer alone (random q/k/v, the same batch and mask).

Rows of `--row-length` slots are filled with documents of random length around `--document-length`; with
`--pairs` every other document is a shared-prompt preference pair (so its block carries a mask).

    python benchmarks/attention.py --row-length 2048 --document-length 200 --rows 2
"""

from __future__ import annotations

import argparse
import time

import torch

from unitrain.data.batch import SEGMENT_CHOSEN, SEGMENT_PLAIN, SEGMENT_PROMPT, SEGMENT_REJECTED, PackedBatch
from unitrain.model import ModelConfig, build_model
from unitrain.model.attention import build_attention

BACKENDS = ("dense", "blocks")


def packed_batch(rows: int, row_length: int, document_length: int, pairs: bool, vocab: int) -> PackedBatch:
    """Full rows of documents with lengths uniform in [document_length / 2, 3 * document_length / 2]."""
    generator = torch.Generator().manual_seed(0)
    shape = (rows, row_length)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_id = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, SEGMENT_PLAIN, dtype=torch.long)
    for r in range(rows):
        slot, doc = 0, 0
        while slot < row_length:
            low, high = document_length // 2, 3 * document_length // 2
            n = min(int(torch.randint(low, high + 1, (1,), generator=generator)), row_length - slot)
            document_id[r, slot : slot + n] = doc
            position_ids[r, slot : slot + n] = torch.arange(n)
            if pairs and doc % 2 and n >= 3:
                prompt, chosen = n // 3, n // 3
                segment[r, slot : slot + prompt] = SEGMENT_PROMPT
                segment[r, slot + prompt : slot + prompt + chosen] = SEGMENT_CHOSEN
                segment[r, slot + prompt + chosen : slot + n] = SEGMENT_REJECTED
                position_ids[r, slot + prompt + chosen : slot + n] = torch.arange(prompt, n - chosen)
            slot, doc = slot + n, doc + 1
    input_ids = torch.randint(0, vocab, shape, generator=generator)
    return PackedBatch.layout_only(input_ids, position_ids, document_id, segment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--row-length", type=int, default=2048)
    parser.add_argument("--document-length", type=int, default=200)
    parser.add_argument("--pairs", action="store_true", help="make every other document a preference pair")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=1024, hidden_size=args.width, intermediate_size=4 * args.width, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.heads,
    )  # fmt: skip
    model = build_model(config)
    batch = packed_batch(args.rows, args.row_length, args.document_length, args.pairs, config.vocab_size)
    print(
        f"rows={args.rows} row_length={args.row_length} documents~{args.document_length} pairs={args.pairs}"
    )
    print(f"width={args.width} layers={args.layers} heads={args.heads} threads={torch.get_num_threads()}")
    heads, head_dim = args.heads, args.width // args.heads
    qkv = [torch.randn(args.rows, args.row_length, heads, head_dim, requires_grad=True) for _ in range(3)]
    timings: dict[str, dict[str, list[float]]] = {b: {"model": [], "attention": []} for b in BACKENDS}
    for repeat in range(args.repeats + 1):  # backends interleaved so background load hits both alike
        for backend in BACKENDS:
            model.attention_backend = backend
            start = time.perf_counter()
            model.hidden_states(batch).square().mean().backward()
            middle = time.perf_counter()
            build_attention(batch, backend)(*qkv).square().mean().backward()
            if repeat:  # the first round warms up allocators and kernels
                timings[backend]["model"].append(middle - start)
                timings[backend]["attention"].append(time.perf_counter() - middle)
    print("| backend | model fwd+bwd ms | model tokens/s | attention op fwd+bwd ms (one layer) |")
    print("|---|---:|---:|---:|")
    for backend, times in timings.items():
        model_s, attention_s = min(times["model"]), min(times["attention"])
        print(
            f"| {backend} | {model_s * 1000:.0f} | {batch.num_tokens / model_s:.0f} | {attention_s * 1000:.0f} |"
        )


if __name__ == "__main__":
    main()
