"""Peak extra memory and time of target log-probs: naive log_softmax over full logits vs the chunked path.

Each measurement runs in a fresh subprocess so the peak is its own: on CUDA `max_memory_allocated`, on CPU the
process's peak resident set size (ru_maxrss) minus the resident size once the inputs exist. "Extra" is what the
log-prob computation (forward + backward to hidden and head weight) adds on top of hidden states and weights.

    python benchmarks/logprobs.py --tokens 2048 --width 512 --vocab 50257 128256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from unitrain.losses.logprobs import target_logprobs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(method: str, tokens: int, width: int, vocab: int, chunk_size: int, device: str) -> dict:
    """One run in this process: returns extra peak bytes and seconds for forward + backward."""
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(
        1, tokens, width, device=device, generator=generator, requires_grad=True
    )  # (1, N, D)
    weight = (
        torch.randn(vocab, width, device=device, generator=generator).mul_(0.02).requires_grad_()
    )  # (V, D)
    positions = torch.arange(tokens, device=device)  # every slot predicts a target
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    hidden.grad = torch.zeros_like(hidden)  # gradient buffers count as inputs, not as extra memory
    weight.grad = torch.zeros_like(weight)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()
    start = time.perf_counter()
    if method == "naive":
        logits = hidden.reshape(-1, width)[positions] @ weight.T  # (N, V) full logits
        logps = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    else:
        logps = target_logprobs(hidden, weight, positions, targets, chunk_size=chunk_size).logps  # (N,)
    logps.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": time.perf_counter() - start, "extra_bytes": max(peak - baseline, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="number of targets N")
    parser.add_argument("--width", type=int, default=512, help="hidden width D")
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 128256], help="vocabulary sizes V")
    parser.add_argument("--chunk-size", type=int, default=512, help="targets per chunk of the chunked path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, vocab = args.one
        print(json.dumps(measure(method, args.tokens, args.width, int(vocab), args.chunk_size, args.device)))
        return
    print(f"device={args.device} tokens={args.tokens} width={args.width} chunk_size={args.chunk_size}")
    print("| vocab | naive extra MiB | chunked extra MiB | ratio | naive s | chunked s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        results = {}
        for method in ("naive", "chunked"):
            command = [sys.executable, __file__, "--one", method, str(vocab)]
            command += ["--tokens", str(args.tokens), "--width", str(args.width)]
            command += ["--chunk-size", str(args.chunk_size), "--device", args.device]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(output.strip().splitlines()[-1])
        naive, chunked = results["naive"], results["chunked"]
        mib = 2**20
        print(
            f"| {vocab} | {naive['extra_bytes'] / mib:.0f} | {chunked['extra_bytes'] / mib:.0f} | "
            f"{chunked['extra_bytes'] / max(naive['extra_bytes'], 1):.3f} | "
            f"{naive['seconds']:.2f} | {chunked['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
