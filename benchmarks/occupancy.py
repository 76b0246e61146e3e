"""Print the attention occupancy table of docs/ops/attention.md: for vision-shaped batches, the share of the computed
score entries (query rows x keys multiplied) that are valid, and of the head-dim columns, before (per-sequence
kernels, today's GPU blocks, head dim padded to a power of two) and after (packed tiles, head dim in two chunks).

    python benchmarks/occupancy.py [--batch 32] [--causal] [--dtype fp16]

Analytic (``mmkernels.kernels.triton.attention_varlen.occupancy``): no kernel runs, no GPU needed.
"""

from __future__ import annotations

import argparse

import torch

from mmkernels.kernels.triton.attention_varlen import occupancy

TOKENS = (197, 257, 577, 1025)  # ViT-B/16 @224, ViT-g/14 & CLIP-L/14 @224, ViT-L/14 @336, ViT @448/14
HEAD_DIMS = (64, 72, 80, 88)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def table(batch: int = 32, causal: bool = False, dtype: torch.dtype = torch.float16) -> list[str]:
    head = ("| tokens | D | blocks before / after | scores valid before | after | head dim valid before | after | "
            "MACs valid before | after | work before / after |")
    lines = [head, "|" + "|".join("---" for _ in range(10)) + "|"]
    for n in TOKENS:
        for d in HEAD_DIMS:
            lens = [n] * batch
            before = occupancy(lens, d, "unpacked", causal=causal, dtype=dtype)
            after = occupancy(lens, d, "packed", causal=causal, dtype=dtype)
            work = (before.computed * before.block_d) / (after.computed * after.block_d)
            lines.append(
                f"| {n} | {d} | {before.block_m}x{before.block_n}xD{before.block_d} / "
                f"{after.block_m}x{after.block_n}xD{after.block_d} | {before.score_fraction:.1%} | "
                f"{after.score_fraction:.1%} | {before.head_dim_fraction:.1%} | {after.head_dim_fraction:.1%} | "
                f"{before.fraction:.1%} | {after.fraction:.1%} | {work:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--causal", action="store_true", help="causal masks (default: full, as vision towers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="picks the blocks (default fp16)")
    args = parser.parse_args()
    print("\n".join(table(args.batch, args.causal, DTYPES[args.dtype])))


if __name__ == "__main__":
    main()
