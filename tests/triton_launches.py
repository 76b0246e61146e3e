"""Record the Triton kernel launches made under ``TRITON_INTERPRET=1`` (kernel, argument types, constexprs,
launch options) as JSON lines, for ``tests/triton_gpu_compile.py`` to compile for real GPU targets.

Two sources of launches:
- the CPU test suite (``MMKERNELS_RECORD_TRITON=<file> pytest tests``): every specialisation the tests ran;
- ``python tests/triton_launches.py <file>``: the configurations the launchers choose **on a GPU** (block sizes,
  warps and stages differ from the interpreter's), for representative model shapes. Kernels are recorded, not
  run, so this takes seconds.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import torch

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _spec(fn, args, kwargs) -> tuple[str, dict]:
    params = inspect.signature(fn).parameters
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
               if k in kwargs}
    bound = dict(zip(params, args)) | kwargs
    signature, constexprs = {}, {}
    for name, p in params.items():
        value = bound.get(name, p.default)
        if "constexpr" in str(p.annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r} of {fn.__name__}")
    spec = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}
    return json.dumps(spec, sort_keys=True), options


def record_launches(path: str, *, execute: bool = True) -> None:
    """Patch the interpreter so each launch appends its specialisation to ``path`` (deduplicated)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: set[str] = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        line, options = _spec(self.fn, args, kwargs)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **options, **kwargs)
        return None

    InterpretedFunction.run = run


def record_gpu_configs(path: str, sm_count: int = 132) -> None:
    """Call every Triton launcher with representative model shapes, recording (not running) its kernels. The
    launchers pick their GPU configurations for the CPU tensors: they see an H100 target (``tuning.SM90``, 132 SMs)
    through ``tuning.assume_target`` while this runs (the interpreter's ``run`` stays patched to record)."""
    record_launches(path, execute=False)
    import dataclasses

    from mmkernels.kernels.triton import tuning

    with tuning.assume_target(dataclasses.replace(tuning.SM90, sm_count=sm_count)):
        _record_gpu_configs()


def _record_gpu_configs() -> None:
    from mmkernels.kernels.triton.attention_varlen import attention_bwd_triton, attention_fwd_triton
    from mmkernels.kernels.triton.patch_embed import (
        patch_embed_bwd_input,
        patch_embed_bwd_tokens,
        patch_embed_bwd_weight,
        patch_embed_fwd,
    )
    from mmkernels.kernels.triton.qformer_attention import qformer_attention_bwd_triton, qformer_attention_fwd_triton
    from mmkernels.ops.moe import moe_route

    for dtype in (torch.float16, torch.float32):  # fp16 specs are compiled as bf16 too
        # attention: ViT shapes (D 64 / 88), LLM shapes (D 128, long), D 256, GQA, causal, varlen
        for b, lq, lk, hq, hkv, d, causal in [(2, 197, 197, 12, 12, 64, False), (2, 257, 257, 16, 16, 88, False),
                                              (1, 4096, 4096, 16, 4, 128, True), (1, 1024, 1024, 8, 8, 256, True),
                                              (2, 577, 577, 16, 16, 80, False), (2, 32, 257, 4, 4, 72, False)]:
            q = torch.randn(b, lq, hq, d, dtype=dtype)
            k = torch.randn(b, lk, hkv, d, dtype=dtype)
            v = torch.randn_like(k)
            out, lse = attention_fwd_triton(q, k, v, None, None, lq, lk, causal, d**-0.5)
            for deterministic in (False, True):
                attention_bwd_triton(torch.randn_like(out), q, k, v, out, lse, None, None, lq, lk, causal, d**-0.5,
                                     deterministic)
        cu = torch.tensor([0, 100, 300, 301], dtype=torch.int32)
        q = torch.randn(301, 8, 128, dtype=dtype)
        out, lse = attention_fwd_triton(q, q, q, cu, cu, 200, 200, True, 0.1)
        attention_bwd_triton(torch.randn_like(out), q, q, q, out, lse, cu, cu, 200, 200, True, 0.1, False)
        # a value head dim different from Q/K's (issue 21, per-sequence kernels only): MLA (192 = 128 + 64 / 128)
        # dense causal and not, varlen causal, dropout; odd pairs 72 / 64 (64 + 16 / 64) and 40 / 24 (32 + 16 / 32)
        seed = torch.tensor([1234], dtype=torch.int64)
        for b, lq, h, dqk, dv, causal, varlen, p in [(1, 2048, 8, 192, 128, True, False, 0.0),
                                                     (1, 2048, 8, 192, 128, False, False, 0.0),
                                                     (4, 512, 8, 192, 128, True, True, 0.0),
                                                     (1, 1024, 8, 192, 128, True, False, 0.1),
                                                     (2, 577, 16, 72, 64, False, False, 0.0),
                                                     (4, 197, 8, 40, 24, True, True, 0.0)]:
            q = torch.randn(b, lq, h, dqk, dtype=dtype)
            k = torch.randn(b, lq, h, dqk, dtype=dtype)
            v = torch.randn(b, lq, h, dv, dtype=dtype)
            cu = None
            if varlen:
                q, k, v = (t.flatten(0, 1) for t in (q, k, v))
                cu = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32)
            args = (cu, cu, lq, lq, causal, dqk**-0.5)
            drop = (p, seed) if p > 0 else ()
            out, lse = attention_fwd_triton(q, k, v, *args, *drop)
            for deterministic in (False, True):
                attention_bwd_triton(torch.randn_like(out), q, k, v, out, lse, *args, deterministic, *drop)
        # attention dropout (a DROPOUT specialisation of each kernel): ViT-B and an LLM head dim
        seed = torch.tensor([1234], dtype=torch.int64)
        for b, lq, h, d in [(2, 197, 12, 64), (1, 1024, 8, 128)]:
            q = torch.randn(b, lq, h, d, dtype=dtype)
            out, lse = attention_fwd_triton(q, q, q, None, None, lq, lq, False, d**-0.5, 0.1, seed)
            for deterministic in (False, True):
                attention_bwd_triton(torch.randn_like(out), q, q, q, out, lse, None, None, lq, lq, False, d**-0.5,
                                     deterministic, 0.1, seed)
        # packed varlen attention (attention_packed.py, forced on): a batch of 4 images per ViT width, GQA causal, and
        # the dropout specialisation
        os.environ["MMKERNELS_ATTENTION_PACKED"] = "1"
        try:
            # (every padded width the packed kernels take: 48, 64, 80, 96, 144, 160, 192)
            for n, hq, hkv, d, causal in [(197, 12, 12, 64, False), (257, 16, 16, 88, False),
                                          (577, 16, 16, 72, False), (197, 12, 4, 80, True), (197, 8, 8, 40, True),
                                          (197, 8, 8, 136, False), (197, 8, 2, 160, True), (197, 8, 8, 192, False)]:
                cu = torch.arange(0, 5 * n, n, dtype=torch.int32)
                q = torch.randn(4 * n, hq, d, dtype=dtype)
                k = torch.randn(4 * n, hkv, d, dtype=dtype)
                v = torch.randn_like(k)
                out, lse = attention_fwd_triton(q, k, v, cu, cu, n, n, causal, d**-0.5)
                for deterministic in (False, True):
                    attention_bwd_triton(torch.randn_like(out), q, k, v, out, lse, cu, cu, n, n, causal, d**-0.5,
                                         deterministic)
            cu = torch.tensor([0, 197, 394], dtype=torch.int32)
            q = torch.randn(394, 12, 72, dtype=dtype)
            out, lse = attention_fwd_triton(q, q, q, cu, cu, 197, 197, False, 72**-0.5, 0.1, seed)
            for deterministic in (False, True):
                attention_bwd_triton(torch.randn_like(out), q, q, q, out, lse, cu, cu, 197, 197, False, 72**-0.5,
                                     deterministic, 0.1, seed)
        finally:
            del os.environ["MMKERNELS_ATTENTION_PACKED"]
        # Q-Former cross-attention: BLIP-2 (32 queries, 257 / 677 keys), small batch (split-K) and large
        for b, lk, d in [(1, 257, 64), (64, 257, 64), (2, 677, 88), (8, 677, 128)]:
            q = torch.randn(b, 32, 12, d, dtype=dtype)
            k = torch.randn(b, lk, 12, d, dtype=dtype)
            lens = torch.full((b,), lk, dtype=torch.int32)
            out, lse = qformer_attention_fwd_triton(q, k, k, lens, d**-0.5)
            qformer_attention_bwd_triton(torch.randn_like(out), q, k, k, out, lse, lens, d**-0.5)
            # the Q-Former's training mode: attention dropout 0.1 (BLIP-2's attention_probs_dropout_prob)
            out, lse = qformer_attention_fwd_triton(q, k, k, lens, d**-0.5, 0, 0.1, seed)
            qformer_attention_bwd_triton(torch.randn_like(out), q, k, k, out, lse, lens, d**-0.5, 0, 0.1, seed)
        # patch embedding: ViT-B/16, ViT-L/14 channels-last, ViT-g/14
        for b, c, hw, p, d, cl in [(8, 3, 224, 16, 768, False), (4, 3, 336, 14, 1024, True),
                                   (4, 3, 224, 14, 1408, False)]:
            px = torch.randn(b, c, hw, hw, dtype=dtype)
            if cl:
                px = px.to(memory_format=torch.channels_last)
            w = torch.randn(d, c, p, p, dtype=dtype)
            n = (hw // p) ** 2 + 1
            y = patch_embed_fwd(px, w, torch.randn(d, dtype=dtype), torch.randn(n, d, dtype=dtype),
                                torch.randn(d, dtype=dtype))
            g = torch.randn_like(y)
            patch_embed_bwd_input(g, w, px, True)
            patch_embed_bwd_weight(g, px, p, True)
            patch_embed_bwd_tokens(g, n, True, True)
        # vision rotary embedding (issue 22): Qwen2.5-VL-7B tower (16 heads, D 80), InternViT-like 25 heads with a
        # [T, D/2] table, D 256 (the kernel's largest); forward and transposed (backward) maps
        from mmkernels.kernels.triton.rotary import rotary_embedding_fwd

        for t, h, d, half in [(4096, 16, 80, False), (16384, 16, 80, False), (1024, 25, 64, True),
                              (777, 8, 256, False)]:
            q, k, _ = torch.randn(t, 3, h, d, dtype=dtype).unbind(1)
            tab = torch.randn(t, d // 2 if half else d)
            for transpose in (False, True):
                rotary_embedding_fwd(q, k, tab, tab, transpose)
        # grouped experts: LongCat-Flash-Lite-like widths (smaller counts; configs depend on dtype only)
        t, n_exp, z, k, dm, di = 256, 16, 8, 12, 3072, 1024
        r = moe_route(torch.randn(t, n_exp + z), top_k=k, num_ffn_experts=n_exp, routed_scaling_factor=6.0)
        x = torch.randn(t, dm, dtype=dtype)
        wgu = torch.randn(n_exp, 2 * di, dm, dtype=dtype)
        wd = torch.randn(n_exp, dm, di, dtype=dtype)
        from mmkernels.kernels.triton import moe as tk

        order, offsets = tk.align(r.topk_ids, n_exp)
        g = tk.tiles(offsets, order.numel(), tk.block_m(dtype))
        args = (x, r.topk_weights, r.zero_weight, wgu, wd, order, g.offsets, g.tile_expert, g.tile_row)
        for deterministic in (False, True):
            torch.ops.mmkernels.moe_experts_fwd_triton(*args, deterministic)
            torch.ops.mmkernels.moe_experts_bwd_triton(torch.randn_like(x), *args, deterministic)
        rows = torch.randn(t * k, dm, dtype=dtype)
        sw = (rows, g.offsets, g.tile_expert, g.tile_row, wgu, wd)
        torch.ops.mmkernels.moe_grouped_swiglu_fwd_triton(*sw)
        torch.ops.mmkernels.moe_grouped_swiglu_bwd_triton(torch.randn_like(rows), *sw)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        sys.exit("needs TRITON_INTERPRET=1")
    target = sys.argv[1]
    open(target, "w").close()  # start empty: record_launches appends
    record_gpu_configs(target)
    with open(target) as f:
        print(f"recorded {sum(1 for _ in f)} launch specialisations to {target}")
