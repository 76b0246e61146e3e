"""mmkernels.ops.rotary_embedding: parity with HF's ``apply_rotary_pos_emb_vision`` (float32 bit for bit, fp16 by
the 2x rule against float64), forward and every gradient (q, k, cos, sin) against a float64 autograd reference, both
cos/sin layouts, awkward shapes and strides, double backward, opcheck, torch.compile, backend choice, bad input.
CPU runs the Triton kernel under the interpreter; bf16 and the Qwen2.5-VL-7B tower sizes are GPU tests."""

from __future__ import annotations

import pytest
import torch

from mmkernels import BackendError
from mmkernels.kernels.reference.rotary import rotary_embedding_reference
from mmkernels.ops import rotary_embedding
from mmkernels.ops.rotary_embedding import ROTARY_BACKENDS
from mmkernels.testing import assert_within_ref_error, count_host_syncs, run_opcheck, tolerance

try:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision as hf_rotary
except ImportError:  # transformers is optional: the HF parity tests skip, the float64 reference still runs
    hf_rotary = None

needs_hf = pytest.mark.skipif(hf_rotary is None, reason="transformers (Qwen2.5-VL) is not installed")


def _qkv_view(r, t, h, d, seed=0):
    """q and k as the vision towers make them: non-contiguous views of one packed qkv projection."""
    q, k, _ = r(t, 3 * h * d, seed=seed).reshape(t, 3, h, d).permute(1, 0, 2, 3).unbind(0)
    return q, k


# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
SAMPLES = {
    "rotary_embedding": lambda r: dict(q=r(5, 3, 10), k=r(5, 2, 10, seed=1), cos=r(5, 10, seed=2),
                                       sin=r(5, 10, seed=3)),
    "rotary_embedding[half_table]": lambda r: dict(q=r(4, 2, 6), k=r(4, 2, 6, seed=1), cos=r(4, 3, seed=2),
                                                   sin=r(4, 3, seed=3)),
}
USAGE_SAMPLES = {
    "rotary_embedding": lambda r: (rotary_embedding, (*_qkv_view(r, 7, 2, 6), r(7, 6, seed=1), r(7, 6, seed=2)), {}),
}

# (T, Hq, Hk, D, q/k layout, table): T = 0 / 1 / odd, Hq != Hk both ways, D = 2 / 8 / 72 / 80 / 128; q and k
# contiguous, views of one qkv projection, or strided along the head dim; the tables as HF's [T, D] (halves with their
# own angles), flash-attn's [T, D/2], or strided views of wider ones.
CASES = [
    (0, 2, 2, 8, "contiguous", "full"),
    (1, 1, 1, 2, "contiguous", "full"),
    (1, 1, 3, 2, "qkv", "half"),
    (7, 3, 2, 72, "contiguous", "full_view"),
    (13, 4, 4, 80, "qkv", "full"),
    (13, 4, 4, 80, "qkv", "half_view"),
    (9, 2, 5, 128, "strided", "half"),
    (33, 5, 3, 80, "strided", "full_view"),
]


def _ids(c):
    return f"T{c[0]}-H{c[1]}x{c[2]}-D{c[3]}-{c[4]}-{c[5]}"


def make_case(t, hq, hk, d, layout, table, *, dtype, device, table_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":
        h = max(hq, hk)
        q, k, _ = torch.randn(t, 3, h, d, generator=g).to(device, dtype).unbind(1)
        q, k = q[:, :hq], k[:, :hk]
    elif layout == "strided":  # every other element of a twice-as-wide head dim: stride 2 along D
        q = torch.randn(t, hq, 2 * d, generator=g).to(device, dtype)[..., ::2]
        k = torch.randn(t, hk, 2 * d, generator=g).to(device, dtype)[..., ::2]
    else:
        q = torch.randn(t, hq, d, generator=g).to(device, dtype)
        k = torch.randn(t, hk, d, generator=g).to(device, dtype)
    width = d // 2 if table.startswith("half") else d
    # independent angles per half for the full table (the kernel may not assume the halves are equal)
    angles = torch.rand(t, width, generator=g) * 6.0
    cos, sin = angles.cos().to(device, table_dtype), angles.sin().to(device, table_dtype)
    if table.endswith("view"):  # strided views of wider tables (HF slices cos[:, :D // 2]-like views)
        wide_c = torch.randn(t, width + 5, generator=g).to(device, table_dtype)
        wide_s = torch.randn(t, width + 5, generator=g).to(device, table_dtype)
        wide_c[:, :width], wide_s[:, :width] = cos, sin
        cos, sin = wide_c[:, :width], wide_s[:, :width]
        assert t < 2 or not cos.is_contiguous()
    if layout != "contiguous" and t > 1:
        assert not q.is_contiguous() and not k.is_contiguous()
    return q, k, cos, sin


def _full(table: torch.Tensor, d: int) -> torch.Tensor:
    return torch.cat((table, table), -1) if table.shape[-1] * 2 == d else table


# ---- parity with HF ----------------------------------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float32_matches_hf_bit_for_bit(case, backend, device):
    """float32: HF's own rounding (each product and the sum rounded on their own, no FMA): bit-identical outputs,
    which is well inside the 1e-6 relative the integration needs."""
    q, k, cos, sin = make_case(*case, dtype=torch.float32, device=device)
    qo, ko = rotary_embedding(q, k, cos, sin, backend=backend)
    want_q, want_k = hf_rotary(q, k, _full(cos, q.shape[-1]), _full(sin, q.shape[-1]))
    for name, got, want in (("q", qo, want_q), ("k", ko, want_k)):
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(got, want), f"{name}: not bit-identical to HF in float32"


@needs_hf
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float16_within_twice_hf_error(case, table_dtype, device):
    """fp16 q/k (and fp16 or fp32 tables): our error against the float64 truth is at most 2x HF's own fp16 error
    (plus the floor of rounding the truth to fp16)."""
    q, k, cos, sin = make_case(*case, dtype=torch.float16, device=device, table_dtype=table_dtype)
    qo, ko = rotary_embedding(q, k, cos, sin, backend="triton")
    d = q.shape[-1]
    hf_q, hf_k = hf_rotary(q, k, _full(cos, d), _full(sin, d))
    truth_q, truth_k = rotary_embedding_reference(q.double(), k.double(), cos.double(), sin.double())
    assert qo.dtype == torch.float16 and ko.dtype == torch.float16
    assert_within_ref_error(qo, hf_q, truth_q, name="q_out")
    assert_within_ref_error(ko, hf_k, truth_k, name="k_out")


# ---- every gradient against float64 ------------------------------------------------------------------------------


def check_gradients(case, dtype, device, backend, table_dtype=torch.float32):
    q, k, cos, sin = make_case(*case, dtype=dtype, device=device, table_dtype=table_dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, cos, sin)]
    qo, ko = rotary_embedding(*leaves, backend=backend)
    g = torch.Generator().manual_seed(1)
    gq = torch.randn(qo.shape, generator=g).to(device, dtype)
    gk = torch.randn(ko.shape, generator=g).to(device, dtype)
    torch.autograd.backward((qo, ko), (gq, gk))

    truth_leaves = [x.detach().double().requires_grad_() for x in (q, k, cos, sin)]
    tq, tk = rotary_embedding_reference(*truth_leaves)
    torch.autograd.backward((tq, tk), (gq.double(), gk.double()))
    heads = q.shape[1] + k.shape[1]
    for name, ours, truth, length in (("q_out", qo, tq, 2), ("k_out", ko, tk, 2)):
        rtol, atol = tolerance(dtype, reduction_length=length)
        torch.testing.assert_close(ours.double(), truth, rtol=rtol, atol=atol, msg=name)
    for name, leaf, truth_leaf, length in zip(("q", "k", "cos", "sin"), leaves, truth_leaves, (2, 2, heads, heads),
                                              strict=True):
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype, name
        # the table gradients sum over heads (and the two halves for a [T, D/2] table) of O(1) terms
        rtol, atol = tolerance(leaf.dtype, reduction_length=2 * length)
        scale = max(1.0, truth_leaf.grad.abs().max().item()) if truth_leaf.numel() else 1.0
        torch.testing.assert_close(leaf.grad.double(), truth_leaf.grad, rtol=rtol, atol=atol * scale,
                                   msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_gradients_match_float64(case, dtype, device):
    check_gradients(case, dtype, device, "triton")


def test_triton_gradients_with_q_dtype_tables(device):
    check_gradients((9, 3, 2, 40, "qkv", "full"), torch.float16, device, "triton", table_dtype=torch.float16)


@pytest.mark.parametrize("case", CASES[3:6], ids=_ids)
def test_reference_gradients_match_float64(case):
    check_gradients(case, torch.float32, torch.device("cpu"), "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(4096, 16, 16, 80, "qkv", "full"), (1000, 25, 25, 64, "qkv", "half"),
                                  (777, 16, 8, 256, "strided", "full_view")], ids=_ids)
def test_triton_gpu(case, dtype):
    check_gradients(case, dtype, torch.device("cuda"), "triton")
    if hf_rotary is not None:
        q, k, cos, sin = make_case(*case, dtype=dtype, device=torch.device("cuda"))
        got = rotary_embedding(q, k, cos, sin, backend="triton")
        want = hf_rotary(q, k, _full(cos, q.shape[-1]), _full(sin, q.shape[-1]))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), "not HF's bits on the GPU"


@pytest.mark.parametrize("blocks", [(1, 1), (4, 2), (2, 4), (8, 8), None], ids=lambda b: "gpu-default" if b is None
                         else f"T{b[0]}-H{b[1]}")
def test_token_and_head_blocks(blocks, monkeypatch, device):
    """Every tiling gives the same bits: several head blocks (k with fewer heads than q, so its last blocks are
    skipped, and the other way round), partial token blocks, and the GPU default config (seen through
    ``tuning.assume_target``: 40 heads in two blocks of 32)."""
    from mmkernels.kernels.triton import rotary as kernels
    from mmkernels.kernels.triton import tuning

    cases = [(9, 5, 3, 12, "qkv", "full"), (9, 2, 7, 12, "strided", "half_view")]
    if blocks is None:
        cases = [(37, 40, 8, 72, "contiguous", "full")]
        target = tuning.SM90 if device.type == "cpu" else None  # None: the card's own target
    else:
        target = None
        monkeypatch.setattr(kernels, "_config", lambda *a: {"BLOCK_T": blocks[0], "BLOCK_H": blocks[1],
                                                            "num_warps": 4})
    for case in cases:
        q, k, cos, sin = make_case(*case, dtype=torch.float32, device=device)
        with tuning.assume_target(target):
            for transpose in (False, True):
                got = kernels.rotary_embedding_fwd(q, k, cos, sin, transpose)
                if transpose:  # the transposed map is the forward with the sines swapped and negated
                    full_s = _full(sin, q.shape[-1])
                    half = q.shape[-1] // 2
                    sin_t = torch.cat((-full_s[:, half:], -full_s[:, :half]), -1)
                    want = rotary_embedding_reference(q, k, _full(cos, q.shape[-1]), sin_t)
                else:
                    want = rotary_embedding_reference(q, k, cos, sin)
                for a, b in zip(got, want, strict=True):
                    assert torch.equal(a, b), (case, transpose)


@pytest.mark.parametrize("need", ["q", "k", "cos", "q+sin"])
def test_partial_requires_grad(need, device):
    """Only some inputs need gradients: the others get none, the ones that do match the reference."""
    q, k, cos, sin = make_case(11, 3, 2, 24, "qkv", "full", dtype=torch.float32, device=device)
    names = ("q", "k", "cos", "sin")
    ours = [x.detach().clone().requires_grad_(n in need.split("+")) for n, x in zip(names, (q, k, cos, sin))]
    ref = [x.detach().clone().requires_grad_(n in need.split("+")) for n, x in zip(names, (q, k, cos, sin))]
    sum(o.square().sum() for o in rotary_embedding(*ours, backend="triton")).backward()
    sum(o.square().sum() for o in rotary_embedding(*ref, backend="reference")).backward()
    for name, a, b in zip(names, ours, ref, strict=True):
        if name in need.split("+"):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert a.grad is None, name


def test_double_backward_matches_reference(device):
    """The op's backward is the same op (transposed), so second derivatives work on the Triton backend too."""
    q, k, cos, sin = make_case(6, 2, 3, 16, "qkv", "full", dtype=torch.float32, device=device)
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, cos, sin)]
        qo, ko = rotary_embedding(*leaves, backend=backend)
        loss = (qo * qo.detach().sin()).sum() + (ko * ko.detach().cos()).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        (grads[0].square().sum() + grads[1].square().sum() + grads[2].sum() * grads[3].sum()).backward()
        results.append([*[g.detach() for g in grads], *[x.grad for x in leaves]])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"result {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
def test_non_finite_input_gives_the_reference_answer(device):
    """NaN / inf in one token's q, k or table: the same outputs (NaN where HF gets NaN) as the reference, and every
    other token untouched."""
    q, k, cos, sin = make_case(6, 3, 2, 10, "qkv", "full", dtype=torch.float32, device=device)
    q, k, cos, sin = q.clone(), k.clone(), cos.clone(), sin.clone()
    q[1, 2, 3], k[4, 0, 7], cos[2, 1], sin[3, 8] = float("nan"), float("inf"), float("inf"), float("-inf")
    got = rotary_embedding(q, k, cos, sin, backend="triton")
    want = rotary_embedding_reference(q, k, cos, sin)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(got[0][[0, 5]]).all() and torch.isfinite(got[1][[0, 1, 5]]).all()


# ---- no copies, one launch -----------------------------------------------------------------------------------------


def test_function_makes_no_copy_of_its_inputs(device):
    """The public function hands the views straight to the op: no contiguous / float copy of q, k, cos or sin."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    q, k, cos, sin = make_case(5, 2, 2, 80, "qkv", "half_view", dtype=torch.float16, device=device)
    with Spy():
        rotary_embedding(q, k, cos, sin, backend="triton")
    assert seen == ["mmkernels.rotary_embedding_fwd_triton"], seen


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_host_sync_forward_or_backward(backend, device):
    """The function, the op and its backward read no tensor value on the host (the towers call it in every layer)."""
    leaves = [x.detach().requires_grad_() for x in make_case(9, 3, 2, 16, "qkv", "half", dtype=torch.float32,
                                                               device=device)]
    with count_host_syncs() as syncs:
        qo, ko = rotary_embedding(*leaves, backend=backend)
        torch.autograd.backward((qo, ko), (torch.ones_like(qo), torch.ones_like(ko)))
    assert syncs.count == 0, syncs.calls
    assert all(x.grad is not None for x in leaves)


# ---- op registration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("table", ["full", "half_view"])
def test_opcheck(table, transpose, device):
    q, k, cos, sin = make_case(7, 3, 2, 12, "qkv", table, dtype=torch.float32, device=device)
    args = tuple(x.detach().requires_grad_() for x in (q, k, cos, sin))
    run_opcheck(torch.ops.mmkernels.rotary_embedding_fwd_triton.default, (*args, transpose))


def test_compile_fullgraph_with_backward(device):
    q, k, cos, sin = make_case(9, 2, 3, 10, "qkv", "full", dtype=torch.float32, device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"

    def fn(q, k, cos, sin):
        qo, ko = rotary_embedding(q, k, cos, sin, backend="triton")
        return qo.square().sum() + ko.sum()

    results = []
    for f in (torch.compile(fn, fullgraph=True, backend=backend), fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, cos, sin)]
        f(*leaves).backward()
        results.append([x.grad for x in leaves])
    for name, a, b in zip(("q", "k", "cos", "sin"), *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# ---- backends ------------------------------------------------------------------------------------------------------


def test_auto_backend(no_backend_env):
    assert ROTARY_BACKENDS.select(torch.device("cpu"))[0] == "reference"
    if torch.cuda.is_available():
        assert ROTARY_BACKENDS.select(torch.device("cuda"))[0] == "triton"
    q, k, cos, sin = make_case(3, 2, 2, 8, "contiguous", "full", dtype=torch.float64, device="cpu")
    qo, ko = rotary_embedding(q, k, cos, sin)  # float64 (with float32 tables) runs on the reference, in float64
    assert qo.dtype == ko.dtype == torch.float64
    truth = rotary_embedding_reference(q, k, cos.double(), sin.double())
    torch.testing.assert_close(qo, truth[0], rtol=1e-12, atol=1e-12)


def test_explicit_backend_errors():
    q, k, cos, sin = make_case(3, 2, 2, 8, "contiguous", "full", dtype=torch.float64, device="cpu")
    with pytest.raises(BackendError, match="float64"):
        rotary_embedding(q, k, cos, sin, backend="triton")
    q, k, cos, sin = make_case(3, 2, 2, 258, "contiguous", "half", dtype=torch.float32, device="cpu")
    with pytest.raises(BackendError, match="head dims up to 256"):
        rotary_embedding(q, k, cos, sin, backend="triton")
    qo, _ = rotary_embedding(q, k, cos, sin)  # auto: the reference takes it
    torch.testing.assert_close(qo, rotary_embedding_reference(q, k, cos, sin)[0])
    with pytest.raises(BackendError, match="not implemented"):
        rotary_embedding(q, k, cos, sin, backend="cuda")


# ---- bad input -----------------------------------------------------------------------------------------------------


def _good():
    return {"q": torch.randn(5, 3, 8), "k": torch.randn(5, 2, 8), "cos": torch.randn(5, 8), "sin": torch.randn(5, 8)}


@pytest.mark.parametrize("changes,exc,match", [
    ({"q": torch.randn(5, 3, 7)}, ValueError, "head dim D .* must be even"),
    ({"q": torch.randn(5, 3, 0), "k": torch.randn(5, 2, 0), "cos": torch.randn(5, 0), "sin": torch.randn(5, 0)},
     ValueError, "must be even and positive"),
    ({"q": torch.randn(5, 8)}, ValueError, "q must have 3 dimension"),
    ({"q": torch.randn(5, 3, 8).int()}, TypeError, "q must be float32"),
    ({"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ({"k": torch.randn(4, 2, 8)}, ValueError, "k must be .* T=5"),
    ({"k": torch.randn(5, 2, 6)}, ValueError, "k must be .* D=8"),
    ({"k": torch.randn(5, 2, 8).half()}, TypeError, "k must have the dtype of q"),
    ({"cos": torch.randn(5, 6), "sin": torch.randn(5, 6)}, ValueError, r"cos must be \[T, D\] = \[5, 8\]"),
    ({"cos": torch.randn(4, 8), "sin": torch.randn(4, 8)}, ValueError, r"cos must be .* got \(4, 8\)"),
    ({"cos": torch.randn(5, 1, 8)}, ValueError, "cos must have 2 dimension"),
    ({"sin": torch.randn(5, 4)}, ValueError, r"sin must have the shape of cos \(5, 8\)"),
    ({"cos": torch.randn(5, 8).double()}, TypeError, r"cos must be float32 or q's dtype \(float32\)"),
    ({"sin": torch.randn(5, 8).half()}, TypeError, "sin must be float32 or q's dtype"),
    ({"k": torch.randn(5, 2, 8, device="meta")}, ValueError, "k is on meta"),
    ({"cos": torch.randn(5, 8, device="meta")}, ValueError, "cos is on meta"),
])
@pytest.mark.parametrize("backend", ["reference", "triton", None])
def test_bad_input(changes, exc, match, backend):
    args = _good() | changes
    with pytest.raises(exc, match=f"^rotary_embedding: .*{match}"):
        rotary_embedding(args["q"], args["k"], args["cos"], args["sin"], backend=backend)


def test_half_precision_tables_with_float32_q_are_an_error():
    """Tables may be float32 or q's dtype: an fp16 table with float32 q would lose precision HF keeps."""
    args = _good()
    with pytest.raises(TypeError, match="cos must be float32 or q's dtype"):
        rotary_embedding(args["q"], args["k"], args["cos"].half(), args["sin"].half())
