"""``vlm``: one training step (forward, caption loss, backward into every parameter) of the vision-language model
(:class:`mmkernels.models.VisionLanguageModel`: ViT -> Q-Former -> ScMoE decoder), with mmkernels' automatic backend
choice against the same model, same weights, on the ``reference`` backend (plain PyTorch for every op).

Training tokens/s is ``params["tokens"] / median`` (tokens = the decoder's sequence: query tokens plus caption
tokens, padding excluded); the ``mem MB`` column is the step's peak memory. There is no Hugging Face row: HF has
no module for this decoder (LongCat-Flash's HF model uses MLA attention and another layer layout, so it would not be
the same model; the vision tower and Q-Former alone are timed by the ``vit`` and ``qformer`` suites against HF).
FLOPs are analytic (GEMMs and attention products, the MoE at its measured K_e FFN experts per token; norms and
softmax left out), so TFLOP/s is approximate.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..suite import BenchConfig, Inputs, Shape, Suite, mmkernels_providers, register_suite

# (preset, batch, caption length)
SHAPES = {
    "quick": [("tiny", 16, 8)],
    "default": [("tiny", 64, 16), ("small", 32, 32)],
}
OURS, REFERENCE = "mmkernels", "mmkernels[reference] (plain PyTorch ops)"
_OPS = ("patch_embed", "attention", "qformer_cross_attention", "moe_route", "moe_experts", "expert_bias_update_")


@functools.cache
def _model(preset: str, device: torch.device, dtype: torch.dtype, backend: str | None):
    """The preset's model with seed-0 weights (the same for every backend), in training mode."""
    from ...models.vlm import VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    return VisionLanguageModel(VLMConfig.preset(preset), backend=backend, device=device, dtype=dtype).train()


def _flops(preset: str, batch: int, length: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the preset at ``batch`` x ``length`` caption tokens."""
    from ...models.vlm import VLMConfig

    c = VLMConfig.preset(preset)
    v, q, d = c.vision, c.qformer, c.decoder
    img = (v.image_size // v.patch_size) ** 2 + 1
    vit = 2 * img * (3 * v.patch_size**2 * v.hidden_size) + v.num_layers * (
        2 * img * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.mlp_dim) + 4 * img * img * v.hidden_size)
    nq, dq = c.num_query_tokens, q.hidden_size
    n_cross = len(q.cross_layers)
    qf = (n_cross * 2 * 2 * img * q.encoder_hidden_size * dq + q.num_hidden_layers * 2 * nq * (
        4 * dq * dq + 2 * dq * q.intermediate_size) + n_cross * 2 * nq * 2 * dq * dq + q.num_hidden_layers * 4 * nq
        * nq * dq + n_cross * 4 * nq * img * dq)
    seq = nq + length
    hd = d.head_dim
    attn = 2 * (2 * seq * d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * hd + 2 * seq * d.num_heads * hd
                * d.hidden_size + 2 * seq * seq * d.num_heads * hd)  # two attention blocks, causal halves QK^T, PV
    dense = 2 * 2 * seq * 3 * d.hidden_size * d.dense_intermediate_size
    k_e = d.target_ffn_per_token if d.target_ffn_per_token is not None else d.top_k
    moe = 2 * seq * d.hidden_size * (d.num_ffn_experts + d.num_zero_experts) + 2 * seq * k_e * 3 * d.hidden_size \
        * d.expert_intermediate_size
    dec = d.num_layers * (attn + dense + moe) + 2 * length * d.hidden_size * d.vocab_size + 2 * nq * dq * d.hidden_size
    return float(batch * (vit + qf + dec))


@functools.cache
def _param_bytes(preset: str, dtype: torch.dtype) -> int:
    """Bytes of every parameter of the preset in ``dtype`` (the router stays fp32), counted on the meta device (no
    memory, no init). Every expert is counted: at these batch sizes each one receives tokens."""
    from ...models.vlm import VisionLanguageModel, VLMConfig

    model = VisionLanguageModel(VLMConfig.preset(preset), device="meta", dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _step(model, pixels, ids, pad):
    logits = model(pixels, ids, padding_mask=pad)
    target = ids[:, 1:].masked_fill(pad[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100)


def _shapes(config: BenchConfig, ours: list) -> list[Shape]:
    from ...models.vlm import VLMConfig

    device, dtype = config.device, config.dtype
    shapes = []
    for preset, batch, length in SHAPES[config.preset]:
        c = VLMConfig.preset(preset)
        s = c.vision.image_size

        def make_inputs(grad, batch=batch, length=length, s=s, c=c):
            pixels = torch.randn(batch, 3, s, s, device=device, dtype=dtype)
            ids = torch.randint(0, c.decoder.vocab_size, (batch, length), device=device)
            lens = torch.randint(length // 2, length + 1, (batch,), device=device)
            pad = torch.arange(length, device=device)[None] >= lens[:, None]  # right padding
            return Inputs((pixels, ids, pad), grad_out=torch.ones((), device=device) if grad else None)

        providers = mmkernels_providers(
            ours, lambda b, p=preset: lambda *x: _step(_model(p, device, dtype, b), *x), label=OURS)
        providers[REFERENCE] = lambda *x, p=preset: _step(_model(p, device, dtype, "reference"), *x)
        tokens = batch * (c.num_query_tokens + 3 * length // 4)  # expected valid tokens (lengths uniform in [L/2, L])
        # Bytes, each tensor once: the forward reads every parameter, the pixels, the int64 ids and the bool padding
        # mask and writes the fp32 loss; the backward reads the parameters again and the pixels (the patch-embedding
        # weight gradient) and writes every parameter's gradient.
        pixel_bytes = batch * 3 * s * s * (torch.finfo(dtype).bits // 8)
        weight_bytes = _param_bytes(preset, dtype)
        shapes.append(Shape(
            name=f"{preset} B={batch} L={length}",
            make_inputs=make_inputs,
            providers=providers,
            baseline=REFERENCE,
            flops=_flops(preset, batch, length),
            bytes=float(weight_bytes + pixel_bytes + 9 * batch * length + 4),
            bwd_bytes=float(2 * weight_bytes + pixel_bytes + 4),
            params={"preset": preset, "batch": batch, "caption_len": length, "tokens": tokens},
        ))
    return shapes


register_suite(Suite(
    name="vlm",
    description="VLM training step tokens/s (params tokens / median) and peak memory: mmkernels vs its reference "
                "backend, same weights",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=_OPS,
    modes=("fwd+bwd",),
    model=True,
))
