"""Shared pieces of the DPO benchmark: the run spec, the data slice, the random checkpoint, FLOP counts, RSS.

Both trainers run in their own worker process (so each peak RSS is its own) and read one `spec.json` written by
`dpo_vs_trl.py`. Trade-off: a process per measurement costs a few seconds of start-up each, but no trainer's
allocations or thread pools leak into another's numbers.
"""

from __future__ import annotations

import gzip
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2" / "tokenizer.json"
ASSISTANT_TAG = "\n\nAssistant:"
EOS_TOKEN = "<|endoftext|>"


@dataclass
class ModelShape:
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 1536
    vocab_size: int = 50257

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder blocks (no embedding, no LM head)."""
        head_dim = self.hidden_size // self.num_heads
        attention = self.hidden_size * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def linear_shapes(self) -> list[tuple[int, int, int]]:
        """(in, out, count per token) of every linear layer a token passes through; the LM head is last."""
        head_dim = self.hidden_size // self.num_heads
        d, i = self.hidden_size, self.intermediate_size
        shapes = [
            (d, self.num_heads * head_dim, 2 * self.num_layers),  # q, o (o transposed: same FLOPs)
            (d, self.num_kv_heads * head_dim, 2 * self.num_layers),  # k, v
            (d, i, 2 * self.num_layers),  # gate, up
            (i, d, self.num_layers),  # down
        ]
        return [*shapes, (d, self.vocab_size, 1)]


@dataclass
class Spec:
    """Everything a worker needs; written once as JSON by the orchestrator."""

    workdir: str
    model_path: str
    gate_reference_path: str
    pairs_path: str  # jsonl: prompt / chosen / rejected strings (TRL's explicit-prompt columns)
    dataset_path: str  # `unitrain prepare` output of the same pairs
    shape: ModelShape = field(default_factory=ModelShape)
    pairs_per_step: int = 4
    warmup_steps: int = 1
    timed_steps: int = 3
    gate_pairs: int = 4
    sequence_length: int = 1024
    beta: float = 0.1
    learning_rate: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trl_gradient_checkpointing: bool = (
        False  # TRL's default is True: recompute instead of storing activations
    )
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        raw = json.loads(Path(path).read_text())
        raw["shape"] = ModelShape(**raw["shape"])
        raw["adam_betas"] = tuple(raw["adam_betas"])
        return cls(**raw)

    @classmethod
    def start_worker(cls, path: str | Path, variant: str) -> Spec:
        """Load the spec in a trainer process and seed it; the gate checks the arithmetic in fp32 on any device."""
        spec = cls.load(path)
        if variant == "gate":
            spec = replace(spec, dtype="float32")
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        return spec


def split_explicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """The prompt ends right after the last `\\n\\nAssistant:` that both dialogues share (as `unitrain prepare`)."""
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    cut = chosen.rfind(ASSISTANT_TAG, 0, shared)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT_TAG)
    return chosen[:end], chosen[end:], rejected[end:]


def select_pairs(
    num_pairs: int,
    max_length: int,
    tokenizer_path: Path = GPT2_TOKENIZER,
    end_tokens: int = 1,
    min_response_tokens: int = 0,
) -> tuple[list[dict], list[dict]]:
    """The first `num_pairs` HH-RLHF rows whose prompt + longer response (+ `end_tokens`, the EOS or a chat
    template's end of turn) fit in `max_length` tokens of the tokenizer (GPT-2 unless given), each response at
    least `min_response_tokens` long.

    Returns (raw rows with implicit prompts, for `unitrain prepare`; explicit prompt/chosen/rejected rows, for TRL).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    raw_rows, explicit_rows = [], []
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            split = split_explicit_prompt(row["chosen"], row["rejected"])
            if split is None:
                continue
            prompt, chosen, rejected = split
            lengths = [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in split]
            if (
                lengths[0] + max(lengths[1:]) + end_tokens > max_length
                or min(lengths[1:]) < min_response_tokens
            ):
                continue
            raw_rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
            explicit_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(raw_rows) == num_pairs:
                break
    return raw_rows, explicit_rows


def save_random_llama(shape: ModelShape, path: Path, seed: int) -> None:
    """A randomly initialized Llama checkpoint written by `transformers` itself (untied LM head, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)


def pair_token_counts(prompt_lengths, chosen_lengths, rejected_lengths) -> dict[str, int]:
    """Token counts of a set of pairs; responses include their EOS."""
    prompt, chosen, rejected = sum(prompt_lengths), sum(chosen_lengths), sum(rejected_lengths)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "unique": prompt + chosen + rejected,
        "duplicated": 2 * prompt + chosen + rejected,
        "targets": chosen + rejected,
    }


def useful_flops(shape: ModelShape, lengths: list[tuple[int, int, int]], online_reference: bool) -> float:
    """FLOPs a DPO step needs at minimum for pairs of (prompt, chosen, rejected) lengths.

    Policy: 6 x body params per unique token, 6 x LM head per predicted response token, and 3 x the forward
    attention FLOPs (4 x hidden per layer per causal query-key pair, prompt shared). Online reference: one third.
    """
    attention_pairs = 0
    unique = targets = 0
    for prompt, chosen, rejected in lengths:
        attention_pairs += prompt * (prompt + 1) // 2
        attention_pairs += chosen * prompt + chosen * (chosen + 1) // 2
        attention_pairs += rejected * prompt + rejected * (rejected + 1) // 2
        unique += prompt + chosen + rejected
        targets += chosen + rejected
    forward = 2 * shape.body_params * unique + 2 * shape.head_params * targets
    forward += 4 * shape.hidden_size * shape.num_layers * attention_pairs
    return forward * (4 if online_reference else 3)


def measure_matmul_peak(
    shape: ModelShape, tokens: int, device: str, dtype: torch.dtype, repeats: int = 3
) -> dict:
    """torch.mm FLOP/s at the model's linear shapes (forward, input-grad and weight-grad products of each).

    Returns the rate of the whole mix weighted by each shape's FLOPs per token (what a perfect implementation of
    this model's matmuls would reach) and the best single shape.
    """
    total_flops = total_seconds = 0.0
    best = 0.0
    for d_in, d_out, count in shape.linear_shapes():
        x = torch.randn(tokens, d_in, device=device, dtype=dtype)
        w = torch.randn(d_in, d_out, device=device, dtype=dtype)
        dy = torch.randn(tokens, d_out, device=device, dtype=dtype)
        products = [(x, w), (dy, w.t()), (x.t(), dy)]
        for a, b in products:
            torch.mm(a, b)  # warm-up: thread pool, allocator, cuBLAS heuristics
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b)
            sync(device)
            seconds = (time.perf_counter() - start) / repeats
            flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            best = max(best, flops / seconds)
            total_flops += count * flops
            total_seconds += count * seconds
    return {"mix_flops_per_s": total_flops / total_seconds, "best_flops_per_s": best, "tokens": tokens}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mib(device: str) -> float | None:
    """Peak accelerator memory allocated by torch in this process, or None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def spread(values: tuple[float, float, float], digits: int) -> str:
    """A (median, min, max) triple as `median (min-max)` for a markdown table."""
    median, low, high = values
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=1))
