"""mmkernels.ops.patch_embed: forward and every gradient against a float64 reference, layouts, opcheck,
torch.compile, backend choice, bad input. CPU runs the Triton kernels under the interpreter (small grid); the
large shapes and bf16 are GPU tests."""

from __future__ import annotations

import pytest
import torch

from mmkernels import BackendError
from mmkernels.kernels.reference.patch_embed import patch_embed_reference
from mmkernels.ops import patch_embed
from mmkernels.ops.patch_embed import PATCH_EMBED_BACKENDS
from mmkernels.testing import run_opcheck, tolerance

HAS_CUDA = torch.cuda.is_available()
# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
SAMPLES = {
    "patch_embed": lambda r: dict(pixels=r(2, 3, 8, 8), weight=r(10, 3, 4, 4, seed=1), bias=r(10, seed=2),
                                  pos_embed=r(5, 10, seed=3), cls_token=r(10, seed=4)),
}
USAGE_SAMPLES = {
    "patch_embed": lambda r: (patch_embed, (r(2, 3, 8, 12), r(10, 3, 4, 4, seed=1), r(10, seed=2)),
                              {"pos_embed": r(6, 10, seed=3)}),
}
NAMES = ("pixels", "weight", "bias", "pos_embed", "cls_token")

# (B, C, H, W, P, D, layout, bias, pos, cls): P in 8/14/16/32, C in 1/3/4, non-square images, B=1, odd D,
# channels-last and a strided (sliced) image, every optional argument on and off.
CPU_CASES = [
    (2, 3, 32, 48, 16, 40, "contiguous", True, True, True),
    (1, 4, 28, 42, 14, 24, "channels_last", True, True, True),
    (2, 1, 16, 8, 8, 17, "contiguous", False, True, False),
    (3, 3, 16, 24, 8, 33, "channels_last", True, False, True),
    (2, 3, 32, 32, 32, 16, "sliced", False, False, False),
    (1, 3, 14, 28, 14, 20, "sliced", True, True, True),
]
GPU_CASES = [
    (8, 3, 224, 224, 16, 768, "contiguous", True, True, True),  # ViT-B/16
    (4, 3, 336, 336, 14, 1024, "channels_last", True, True, True),  # ViT-L/14 @ 336
    (4, 3, 224, 224, 14, 1408, "contiguous", True, True, True),  # ViT-g/14 (BLIP-2)
    (5, 4, 96, 160, 8, 200, "sliced", True, True, False),
    (3, 1, 64, 32, 32, 100, "channels_last", False, True, True),
]


def make_case(b, c, h, w, p, d, layout, has_bias, has_pos, has_cls, *, dtype, device, pos_3d=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    seq = (1 if has_cls else 0) + (h // p) * (w // p)
    tensors = {
        "pixels": x,
        "weight": torch.randn(d, c, p, p, generator=g) / (c * p * p) ** 0.5,
        "bias": torch.randn(d, generator=g) if has_bias else None,
        "pos_embed": torch.randn((1, seq, d) if pos_3d else (seq, d), generator=g) if has_pos else None,
        "cls_token": torch.randn(1, 1, d, generator=g) if has_cls else None,
    }
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if name == "pixels" and layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        if name == "pixels" and layout == "sliced":
            t = t.repeat_interleave(2, dim=-1)[..., ::2]  # a strided view (the dtype cast above copied the data)
        out[name] = t.requires_grad_()
    if layout == "sliced":
        assert not out["pixels"].is_contiguous()
    return out


def assert_close(actual, expected, dtype, *, reduction_length=1, msg=""):
    """The table's tolerance for ``dtype``, with the absolute part scaled by the tensor's magnitude (outputs are
    sums of O(1) terms that can cancel to near zero, so a fixed atol would measure cancellation, not the op)."""
    rtol, atol = tolerance(dtype, reduction_length=reduction_length)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{msg}: {m}")


def run(inputs, backend, **kw):
    return patch_embed(inputs["pixels"], inputs["weight"], inputs["bias"], pos_embed=inputs["pos_embed"],
                       cls_token=inputs["cls_token"], backend=backend, **kw)


def check_against_float64(case, dtype, device, backend):
    b, c, h, w, p, d = case[:6]
    inputs = make_case(*case, dtype=dtype, device=device)
    out = run(inputs, backend)
    seq = (1 if case[9] else 0) + (h // p) * (w // p)
    assert out.shape == (b, seq, d) and out.dtype == dtype and out.is_contiguous()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out.backward(grad)

    truth_in = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    truth = patch_embed_reference(truth_in["pixels"], truth_in["weight"], truth_in["bias"], truth_in["pos_embed"],
                                  truth_in["cls_token"])
    truth.backward(grad.double())

    kk = c * p * p
    assert_close(out, truth, dtype, reduction_length=kk, msg="output")
    lengths = {"pixels": d, "weight": b * seq, "bias": b * seq, "pos_embed": b, "cls_token": b}
    for name in NAMES:
        if inputs[name] is None:
            continue
        ours, ref = inputs[name].grad, truth_in[name].grad
        assert ours is not None, f"no gradient for {name}"
        assert ours.shape == inputs[name].shape and ours.dtype == dtype, name
        assert_close(ours, ref, dtype, reduction_length=lengths[name], msg=f"grad {name}")
    if case[6] == "channels_last":  # the pixel gradient comes back in the pixels' layout
        assert inputs["pixels"].grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}")
def test_triton_matches_float64(case, dtype, device):
    check_against_float64(case, dtype, device, "triton")


@pytest.mark.parametrize("case", CPU_CASES[:2], ids=["contiguous", "channels_last"])
def test_reference_matches_float64(case):
    check_against_float64(case, torch.float32, torch.device("cpu"), "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}")
def test_triton_matches_float64_gpu(case, dtype):
    check_against_float64(case, dtype, torch.device("cuda"), "triton")


@pytest.mark.parametrize("splits", [2, 4])
def test_split_reductions(monkeypatch, device, splits):
    """The GPU's chunked reductions (weight gradient over patch rows, token gradients over the batch), forced on
    with 16-wide tiles so that the 50 patch rows span several chunks."""
    from mmkernels.kernels.triton import patch_embed as kernels

    small = {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(kernels, "_gemm_config", lambda *a: small)
    monkeypatch.setattr(kernels, "_weight_grad_splits", lambda *a: splits)
    monkeypatch.setattr(kernels, "_token_grad_splits", lambda *a: splits)
    check_against_float64((5, 3, 16, 40, 8, 20, "contiguous", True, True, True), torch.float32, device, "triton")


def test_empty_batch(device):
    inputs = make_case(0, 3, 16, 16, 8, 12, "contiguous", True, True, True, dtype=torch.float32, device=device)
    out = run(inputs, "triton")
    assert out.shape == (0, 5, 12)
    out.sum().backward()
    assert inputs["pixels"].grad.shape == (0, 3, 16, 16)
    for name in ("weight", "bias", "pos_embed", "cls_token"):
        assert torch.count_nonzero(inputs[name].grad) == 0, name


def test_partial_requires_grad(device):
    """Only some inputs need gradients: the others get none and their kernels do not run."""
    inputs = make_case(2, 3, 16, 32, 8, 24, "contiguous", True, True, True, dtype=torch.float32, device=device)
    inputs["pixels"].requires_grad_(False)
    inputs["pos_embed"].requires_grad_(False)
    out = run(inputs, "triton")
    out.square().sum().backward()
    assert inputs["pixels"].grad is None and inputs["pos_embed"].grad is None
    ref = {n: (t.detach().clone().requires_grad_(n in ("weight", "bias", "cls_token")) if t is not None else None)
           for n, t in inputs.items()}
    run(ref, "reference").square().sum().backward()
    for name in ("weight", "bias", "cls_token"):
        assert_close(inputs[name].grad, ref[name].grad, torch.float32, reduction_length=2 * 9, msg=name)


def test_pos_embed_2d_and_cls_1d(device):
    inputs = make_case(2, 3, 16, 16, 8, 8, "contiguous", True, True, True, dtype=torch.float32, device=device)
    out3 = run(inputs, "triton")
    out2 = patch_embed(inputs["pixels"], inputs["weight"], inputs["bias"], pos_embed=inputs["pos_embed"][0],
                       cls_token=inputs["cls_token"].reshape(-1), backend="triton")
    torch.testing.assert_close(out2, out3, rtol=0, atol=0)
    out2.sum().backward()
    assert inputs["pos_embed"].grad.shape == (1, 5, 8) and inputs["cls_token"].grad.shape == (1, 1, 8)


def test_opcheck(device):
    inputs = make_case(2, 3, 16, 24, 8, 16, "contiguous", True, True, True, dtype=torch.float32, device=device)
    args = tuple(inputs[n] for n in NAMES)
    args = (args[0], args[1], args[2], args[3].detach().reshape(7, 16).requires_grad_(),
            args[4].detach().reshape(16).requires_grad_())
    run_opcheck(torch.ops.mmkernels.patch_embed_fwd_triton.default, args)
    plain = make_case(1, 4, 14, 28, 14, 8, "channels_last", False, False, False, dtype=torch.float32, device=device)
    run_opcheck(torch.ops.mmkernels.patch_embed_fwd_triton.default,
                (plain["pixels"], plain["weight"], None, None, None))
    x, w = inputs["pixels"].detach(), inputs["weight"].detach()
    g = torch.randn(2, 7, 16, device=device)
    run_opcheck(torch.ops.mmkernels.patch_embed_bwd_input_triton.default, (g, w, x, True))
    run_opcheck(torch.ops.mmkernels.patch_embed_bwd_weight_triton.default, (g, x, 8, True))
    run_opcheck(torch.ops.mmkernels.patch_embed_bwd_tokens_triton.default, (g, 7, True, True))
    run_opcheck(torch.ops.mmkernels.patch_embed_bwd_tokens_triton.default, (g, 1, True, False))


def test_compile_fullgraph(device):
    inputs = make_case(2, 3, 16, 24, 8, 16, "contiguous", True, True, True, dtype=torch.float32, device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"

    def fn(x, w, b, pos, cls):
        return patch_embed(x, w, b, pos_embed=pos, cls_token=cls, backend="triton").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    args = [inputs[n] for n in NAMES]
    compiled(*args).backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    fn(*args).backward()
    for name, g, a in zip(NAMES, got, args, strict=True):
        torch.testing.assert_close(g, a.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_auto_backend(no_backend_env):
    assert PATCH_EMBED_BACKENDS.select(torch.device("cpu"))[0] == "reference"
    if HAS_CUDA:
        assert PATCH_EMBED_BACKENDS.select(torch.device("cuda"))[0] == "triton"
    # float64 always runs on the reference
    inputs = make_case(1, 3, 16, 16, 8, 8, "contiguous", True, True, True, dtype=torch.float64, device="cpu")
    assert run(inputs, None).dtype == torch.float64


def test_explicit_backend_errors():
    inputs = make_case(1, 3, 16, 16, 8, 8, "contiguous", True, True, True, dtype=torch.float64, device="cpu")
    with pytest.raises(BackendError, match="float64"):
        run(inputs, "triton")
    inputs = make_case(1, 3, 16, 16, 8, 8, "contiguous", True, True, True, dtype=torch.float32, device="cpu")
    with pytest.raises(BackendError, match="not implemented"):
        run(inputs, "cuda")


def _bad(**changes):
    x = torch.randn(2, 3, 32, 32)
    args = {"pixels": x, "weight": torch.randn(8, 3, 16, 16), "bias": torch.randn(8),
            "pos_embed": torch.randn(1, 5, 8), "cls_token": torch.randn(1, 1, 8)}
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,exc,match", [
    ({"pixels": torch.randn(2, 3, 30, 32)}, ValueError, "multiples of the patch size P=16"),
    ({"pixels": torch.randn(2, 3, 32, 40)}, ValueError, "32 x 40"),
    ({"pixels": torch.randn(2, 3, 8, 8)}, ValueError, "positive multiples"),
    ({"pixels": torch.randn(3, 32, 32)}, ValueError, "pixels must have 4 dimension"),
    ({"pixels": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)}, TypeError, "pixels must be"),
    ({"pixels": [1.0]}, TypeError, "pixels must be a torch.Tensor"),
    ({"weight": torch.randn(8, 4, 16, 16)}, ValueError, "4 input channels but pixels have C=3"),
    ({"weight": torch.randn(8, 3, 16, 8)}, ValueError, "square patch"),
    ({"weight": torch.randn(8, 3 * 16 * 16)}, ValueError, "weight must have 4 dimension"),
    ({"bias": torch.randn(9)}, ValueError, r"bias must have shape \[D\] = \[8\]"),
    ({"pos_embed": torch.randn(1, 4, 8)}, ValueError, "L = 5"),
    ({"pos_embed": torch.randn(2, 5, 8)}, ValueError, "pos_embed must have shape"),
    ({"cls_token": torch.randn(2, 8)}, ValueError, "cls_token must have shape"),
    ({"bias": torch.randn(8, dtype=torch.float64)}, TypeError, "bias must have the dtype of pixels"),
    ({"weight": torch.randn(8, 3, 16, 16, dtype=torch.float16)}, TypeError, "weight must have the dtype"),
    ({"pos_embed": torch.randn(1, 5, 8, device="meta")}, ValueError, "one device"),
])
def test_bad_input(changes, exc, match):
    args = _bad(**changes)
    with pytest.raises(exc, match=match):
        patch_embed(args["pixels"], args["weight"], args["bias"], pos_embed=args["pos_embed"],
                    cls_token=args["cls_token"], backend="reference")


# Non-tensor values for each tensor argument. DESIGN.md types every argument as a Tensor (differentiable in each), so a
# list, tuple or NumPy array is a TypeError naming the argument, before any backend runs: the same on every backend.
NON_TENSORS = [
    ("pos_embed", lambda t: t.tolist()),
    ("pos_embed", lambda t: t[0].tolist()),
    ("pos_embed", lambda t: tuple(t[0].tolist())),
    ("pos_embed", lambda t: t.numpy()),
    ("cls_token", lambda t: t.flatten().tolist()),
    ("bias", lambda t: t.tolist()),
    ("weight", lambda t: t.numpy()),
]


@pytest.mark.parametrize("backend", ["reference", "triton", None])
@pytest.mark.parametrize("name,convert", NON_TENSORS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(NON_TENSORS)])
def test_non_tensor_arguments_are_a_type_error_on_every_backend(name, convert, backend, device):
    args = {n: t.to(device) for n, t in _bad().items()}
    args[name] = convert(args[name].cpu())
    with pytest.raises(TypeError, match=f"patch_embed: {name} must be a torch.Tensor, got "):
        patch_embed(args["pixels"], args["weight"], args["bias"], pos_embed=args["pos_embed"],
                    cls_token=args["cls_token"], backend=backend)


def test_pos_embed_without_cls_counts_patches_only():
    x, w = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16)
    patch_embed(x, w, pos_embed=torch.randn(4, 8), backend="reference")
    with pytest.raises(ValueError, match="L = 4"):
        patch_embed(x, w, pos_embed=torch.randn(5, 8), backend="reference")


# ---- flattened 2-D / 3-D patches (Qwen-VL towers: a stride = kernel Conv3d over pre-flattened patches) ----------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("n, c, t, p, d, bias", [(37, 3, 2, 4, 40, False), (1, 3, 2, 6, 17, True),
                                                 (5, 1, 3, 2, 8, True), (0, 3, 2, 4, 8, True)])
def test_flattened_patches_equal_conv3d(n, c, t, p, d, bias, backend):
    """``patch_embed`` over N one-patch images of C*T channels is the Conv3d (stride = kernel) over flattened
    patches, forward and every gradient (views of the inputs: nothing copied)."""
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, c * t * p * p, generator=g, requires_grad=True)
    w = torch.randn(d, c, t, p, p, generator=g, requires_grad=True)
    b = torch.randn(d, generator=g, requires_grad=True) if bias else None
    ref = torch.nn.functional.conv3d(x.double().view(-1, c, t, p, p), w.double(), None if b is None else b.double(),
                                     stride=(t, p, p)).view(n, d)
    out = patch_embed(x.view(n, c * t, p, p), w.view(d, c * t, p, p), b, backend=backend).view(n, d)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(n, d, generator=g)
    wanted = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad(out, wanted, grad, allow_unused=True)
    exp = torch.autograd.grad(ref, wanted, grad.double(), allow_unused=True)
    for name, a, e in zip(("x", "w", "b"), got, exp):
        e = torch.zeros_like(a) if e is None else e
        torch.testing.assert_close(a.double(), e.double(), atol=1e-4, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
