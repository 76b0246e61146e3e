"""Per-device kernel configurations (kernels/triton/tuning.py) and `mmkernels-bench tune`.

Lookups are tested as on a GPU: ``tuning.assume_target(tuning.SM90)`` (as tests/triton_launches.py does) and
``MMKERNELS_TUNING_DEVICE`` names the card, so no GPU is needed. The sweep runs through the real launchers under the
interpreter with an injected timer: everything but the timing itself runs here.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

import mmkernels
from mmkernels._backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

if triton_available():
    from mmkernels.bench import tune as bench_tune
    from mmkernels.bench.tune_cases import cases as tune_cases
    from mmkernels.kernels.triton import attention as tattn
    from mmkernels.kernels.triton import moe as tmoe
    from mmkernels.kernels.triton import patch_embed as tpatch
    from mmkernels.kernels.triton import qformer_attention as tqf
    from mmkernels.kernels.triton import tuning

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """An empty user tuning folder and an empty shipped folder, the device named H100, caches dropped."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv("MMKERNELS_TUNING_DIR", str(user))
    monkeypatch.setenv("MMKERNELS_TUNING_DEVICE", H100)
    monkeypatch.delenv("MMKERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "CONFIG_DIR", shipped)
    tuning.reload()
    yield user, shipped
    tuning.reload()


@pytest.fixture
def as_on_gpu():
    """Launchers and lookups behave as for a GPU launch (no kernel is run while this is on)."""
    with tuning.assume_target(tuning.SM90):
        yield


def _write(folder, name, kernels, fmt=None, stamp=True):
    """A tuning file as ``save`` writes it: every entry that is an object stamped with what it was tuned for (this
    install's versions and kernel source hash), unless ``stamp`` is False."""
    if stamp:
        kernels = {k: ({key: ({**cfg, tuning.TUNED_FOR: tuning.tuned_for(k)}
                              if isinstance(cfg, dict) and k in tuning.SPACES else cfg) for key, cfg in table.items()}
                       if isinstance(table, dict) else table) for k, table in kernels.items()}
    path = folder / f"{tuning.device_slug(name)}.json"
    path.write_text(json.dumps({"format": tuning.FORMAT if fmt is None else fmt, "device": name,
                                "kernels": kernels}))
    return path


ATTN = dict(dtype=torch.float16, block_d=64, causal=False, lq=197, lk=197)
FWD_CFG = {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}


def _pick_fwd(shape=ATTN, like=None):
    like = torch.empty(1, dtype=torch.float16) if like is None else like
    default = tattn._Config(128, 64, 4, 3)
    return tuning.pick("attention_fwd", shape, default, like=like), default


# ---- names, buckets --------------------------------------------------------------------------------------------


def test_device_slug_matches_vllm_spelling():
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuning.device_slug("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB"
    assert tuning.device_slug("NVIDIA H200") == "NVIDIA_H200"


@pytest.mark.parametrize("lq,lk,seq", [(1, 1, 16), (197, 197, 256), (256, 256, 256), (257, 257, 512),
                                       (32, 577, 1024), (1025, 1025, 2048), (10**6, 10**6, 16384)])
def test_attention_bucket_is_the_first_rung_at_or_above_the_longer_side(lq, lk, seq):
    key = tuning.bucket_key("attention_fwd", dict(ATTN, lq=lq, lk=lk, causal=True))
    assert key == f"dtype=fp16,d=64,causal=1,seq={seq}"


def test_backward_buckets_name_the_atomic_mode_and_moe_buckets_rows_per_expert():
    assert tuning.bucket_key("attention_bwd_dkdv", dict(ATTN, atomic=True)).endswith("seq=256,atomic=1")
    # 8 experts, BLOCK_M 64, 2000 rows: 32 tiles + 8 -> (40 - 8) * 64 / 8 = 256 rows per expert
    shape = dict(dtype=torch.bfloat16, gated=True, block_m=64, n=1024, k=3072, experts=8, tiles=40)
    assert tuning.bucket_key("moe_grouped_gemm", shape) == "dtype=bf16,gated=1,m=64,n=1024,k=4096,tpe=256"
    assert tuning.bucket_key("patch_embed_fwd", dict(dtype=torch.float16, m=1576, n=768, k=768)) == \
        "dtype=fp16,m=2048,n=1024,k=1024"


def test_symbolic_sizes_bucket_through_guards_not_errors():
    """Inside torch.compile with dynamic shapes the sizes are SymInts: bucketing and the block shrink compare only."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    lq = env.create_symintnode(env.create_symbol(197, ConstantSource("lq")), hint=197)
    assert tuning.bucket_key("attention_fwd", dict(ATTN, lq=lq, lk=lq)) == "dtype=fp16,d=64,causal=0,seq=256"
    assert tuning.shrink(128, lq) == 128 and tuning.shrink(512, lq) == 256


# ---- lookup -------------------------------------------------------------------------------------------------------


def test_interpreter_always_gets_the_default_even_with_a_file(files):
    user, _ = files
    _write(user, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}})
    got, default = _pick_fwd()
    assert got is default


def test_shipped_file_for_this_device_name_is_used(files, as_on_gpu):
    _, shipped = files
    _write(shipped, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, _ms=0.1)}})
    got, _ = _pick_fwd()
    assert got == tattn._Config(64, 32, 8, 2)


def test_another_device_name_or_a_cpu_tensor_gets_the_default(files, as_on_gpu, monkeypatch):
    _, shipped = files
    _write(shipped, "NVIDIA A100-SXM4-80GB", {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}})
    got, default = _pick_fwd()
    assert got is default
    monkeypatch.delenv("MMKERNELS_TUNING_DEVICE")
    tuning.reload()
    got, default = _pick_fwd()  # a CPU tensor names no device
    assert got is default


def test_user_file_wins_over_the_shipped_one(files, as_on_gpu):
    user, shipped = files
    _write(shipped, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}})
    _write(user, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, num_warps=4)}})
    got, _ = _pick_fwd()
    assert got.num_warps == 4


def test_missing_bucket_takes_the_nearest_tuned_bucket_of_the_same_kind_else_the_default(files, as_on_gpu):
    _, shipped = files
    _write(shipped, H100, {"attention_fwd": {
        "dtype=fp16,d=64,causal=0,seq=1024": dict(FWD_CFG, block_m=128, block_n=128),
        "dtype=fp16,d=64,causal=0,seq=64": dict(FWD_CFG, num_warps=4),
    }})
    got, _ = _pick_fwd(dict(ATTN, lq=700, lk=700))  # bucket 1024: exact
    assert (got.block_m, got.block_n, got.num_warps) == (128, 128, 8)
    got, _ = _pick_fwd(dict(ATTN, lq=400, lk=400))  # bucket 512: nearest is 1024 (one rung) not 64 (three)
    assert got.num_warps == 8
    got, _ = _pick_fwd(dict(ATTN, lq=40, lk=40))  # bucket 64: exact; blocks shrink to the sequence
    assert got == tattn._Config(64, 32, 4, 2)
    got, _ = _pick_fwd(dict(ATTN, lq=20, lk=20))  # bucket 32 -> nearest 64's config, shrunk for 20 rows
    assert (got.block_m, got.block_n) == (32, 32)
    got, default = _pick_fwd(dict(ATTN, causal=True))  # no causal entry at all
    assert got is default
    got, default = _pick_fwd(dict(ATTN, dtype=torch.bfloat16))
    assert got is default


def test_each_launcher_family_converts_to_its_default_type(files, as_on_gpu):
    _, shipped = files
    _write(shipped, H100, {
        "qformer_fwd": {"dtype=fp16,m=32,d=64,seq=512": {"block_n": 32, "num_warps": 8, "num_stages": 1}},
        "patch_embed_fwd": {"dtype=fp16,m=2048,n=1024,k=1024": {"BM": 64, "BN": 256, "BK": 32, "num_warps": 8,
                                                                 "num_stages": 4}},
        "moe_grouped_gemm": {"dtype=fp16,gated=0,m=64,n=4096,k=1024,tpe=256": {
            "block_n": 256, "block_k": 32, "num_warps": 4, "num_stages": 4}},
    })
    like = torch.empty(1, dtype=torch.float16)
    qf_default = tqf._config(32, 64, torch.float16, tuning.SM90, False)
    got = tuning.pick("qformer_fwd", dict(dtype=torch.float16, block_m=32, block_d=64, lk=257), qf_default, like=like)
    assert got == (32, 8, 1)
    pe_default = tpatch._gemm_config(tuning.SM90, torch.float16, 1576, 768, 768)
    got = tuning.pick("patch_embed_fwd", dict(dtype=torch.float16, m=1576, n=768, k=768), pe_default, like=like)
    assert got == dict(pe_default, BM=64, BN=256, BK=32, num_warps=8, num_stages=4)
    moe_default = tmoe._blocks(torch.float16)
    shape = dict(dtype=torch.float16, gated=False, block_m=64, n=3072, k=1024, experts=8, tiles=40)
    got = tuning.pick("moe_grouped_gemm", shape, moe_default, like=like)
    assert got == (moe_default[0], 256, 32, 4, 4)  # BLOCK_M stays the alignment's


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot read it as JSON"),
    (json.dumps({"format": 99, "kernels": {}}), "not a format-2 tuning file \\(its format is 99"),
    (json.dumps({"format": 1, "kernels": {}}), "not a format-2 tuning file \\(its format is 1"),
    (json.dumps([1, 2]), "the top level is a list, not a JSON object"),
    (json.dumps({"format": 2, "kernels": []}), "'kernels' is a list, not an object"),
    (json.dumps({"format": 2}), "no 'kernels' object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe{}", "cannot read it as JSON"),
])
def test_unreadable_file_is_ignored_with_a_warning(files, as_on_gpu, content, match):
    _, shipped = files
    (shipped / f"{tuning.device_slug(H100)}.json").write_bytes(content.encode() if isinstance(content, str)
                                                               else content)
    with pytest.warns(tuning.TuningConfigWarning, match=match):
        got, default = _pick_fwd()
    assert got is default


def _special_file(kind, path):
    """Make ``path`` a file that must never be read: a FIFO (opening it blocks until a writer comes), a link to
    /dev/zero (endless), a folder, a file over the size limit."""
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(tuning.MAX_FILE_BYTES + 1)  # sparse: nothing is written
    return {"fifo": "not a regular file", "dev-zero": "not a regular file", "folder": "not a regular file",
            "huge": "over the .*-byte limit"}[kind]


@pytest.mark.parametrize("where", ["user", "shipped"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "huge"])
def test_a_file_that_is_not_a_bounded_regular_file_is_never_read(files, as_on_gpu, where, kind):
    """The finding: a FIFO as the user file hung the first launch forever. Every source (user file, shipped file) is
    checked before it is read; the launch gets the default with one warning, and another source still applies."""
    user, shipped = files
    folder, other = (user, shipped) if where == "user" else (shipped, user)
    match = _special_file(kind, folder / f"{tuning.device_slug(H100)}.json")
    _write(other, H100, {"attention_bwd_dq": {"dtype=fp16,d=64,causal=0,seq=256": {
        "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, default = _pick_fwd()  # would block forever on the FIFO, or read /dev/zero until memory runs out
    ours = [str(w.message) for w in caught if issubclass(w.category, tuning.TuningConfigWarning)]
    assert len(ours) == 1 and re.search(match, ours[0]), ours
    assert got is default
    dq = tuning.pick("attention_bwd_dq", ATTN, tattn._Config(128, 32, 4, 3), like=torch.empty(1))
    assert dq == tattn._Config(64, 64, 4, 1)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_save_refuses_to_replace_or_read_a_special_file(tmp_path, kind):
    path = tmp_path / "x.json"
    _special_file(kind, path)
    result = tuning.BucketResult("dtype=fp16,d=64,causal=0,seq=256", dict(FWD_CFG), 0.5, 1.0, 3, 9, {}, True)
    with pytest.raises(OSError, match="not a regular file"):
        tuning.save(path, H100, [("attention_fwd", result)])
    assert path.is_symlink() or not path.is_file()  # left as it was


@pytest.mark.parametrize("field,value", [("mmkernels", "0.0.1"), ("triton", "2.0.0"), ("torch", "1.13.0"),
                                         ("source", "0123456789abcdef"), (None, None)])
def test_entry_tuned_for_another_version_or_kernel_source_is_stale(files, as_on_gpu, field, value):
    """Each stamp field alone makes an entry stale (ignored with one warning naming it); no stamp at all too. The
    file's current entries still apply."""
    _, shipped = files
    fresh = {"dtype=fp16,d=64,causal=0,seq=256": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}}
    stamp = None if field is None else dict(tuning.tuned_for("attention_fwd"), **{field: value})
    entry = dict(FWD_CFG) if stamp is None else dict(FWD_CFG, **{tuning.TUNED_FOR: stamp})
    path = _write(shipped, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": entry}}, stamp=False)
    raw = json.loads(path.read_text())
    raw["kernels"]["attention_bwd_dq"] = {k: dict(v, **{tuning.TUNED_FOR: tuning.tuned_for("attention_bwd_dq")})
                                          for k, v in fresh.items()}
    path.write_text(json.dumps(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, default = _pick_fwd()
    ours = [str(w.message) for w in caught if issubclass(w.category, tuning.TuningConfigWarning)]
    assert len(ours) == 1 and "stale" in ours[0] and "[dtype=fp16,d=64,causal=0,seq=256]" in ours[0], ours
    if field is not None:
        label = "kernel source" if field == "source" else field
        assert f"{label} {value!r}" in ours[0], ours
    assert got is default
    assert tuning.pick("attention_bwd_dq", ATTN, tattn._Config(128, 32, 4, 3), like=torch.empty(1)) == \
        tattn._Config(64, 64, 4, 1)


def test_tune_retunes_stale_buckets(tmp_path, monkeypatch):
    """A bucket whose entry is stale counts as untuned: ``tune`` sweeps it again and the new stamp replaces it."""
    out = tmp_path / "x.json"
    shape = next(c for c in tune_cases("qformer_fwd") if c["dtype"] == torch.float16)
    key = tuning.bucket_key("qformer_fwd", shape)
    cfg = {"block_n": 64, "num_warps": 4, "num_stages": 2}
    stamp = dict(tuning.tuned_for("qformer_fwd"), triton="0.0.0")
    out.write_text(json.dumps({"format": tuning.FORMAT, "device": H100, "kernels": {
        "qformer_fwd": {key: dict(cfg, **{tuning.TUNED_FOR: stamp})}}}))
    swept = []

    def fake_sweep(space, shape, device, **kw):
        swept.append(tuning.bucket_key(space.kernel, shape))
        return tuning.BucketResult(swept[-1], kw["default"], 1.0, 1.0, 0, 1, {}, True)

    monkeypatch.setattr(tuning, "sweep", fake_sweep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tuning.TuningConfigWarning)
        bench_tune.tune(["qformer_fwd"], device=torch.device("cpu"), budget=60, out=out, name=H100,
                    dtypes=[torch.float16], report=lambda line: None)
    assert key in swept
    entry = json.loads(out.read_text())["kernels"]["qformer_fwd"][key]
    assert entry[tuning.TUNED_FOR] == tuning.tuned_for("qformer_fwd")


_WRITER = """
import os, sys, time
from pathlib import Path
from mmkernels.kernels.triton import tuning
path, first, count, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
for d in range(first, first + count):
    result = tuning.BucketResult(f"dtype=fp16,d={d},causal=0,seq=256", {"block_m": 64, "block_n": 32,
                                 "num_warps": 4, "num_stages": 2}, 0.5, 1.0, 1, 1, {}, True)
    tuning.save(path, "NVIDIA H100 80GB HBM3", [("attention_fwd", result)])
"""


def test_concurrent_writers_in_separate_processes_keep_every_entry(tmp_path):
    """The finding: two processes saving at once lost entries (28 and 35 of 50 buckets survived). 4 writer processes
    x 30 buckets each, released together, all into one file: all 120 entries survive, and the file loads clean."""
    import os
    import subprocess
    import sys

    path, go = tmp_path / "shared.json", tmp_path / "go"
    writers, per_writer = 4, 30
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(1 + i * per_writer), str(per_writer),
                               str(go)], env=env, stderr=subprocess.PIPE, text=True) for i in range(writers)]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    data = json.loads(path.read_text())
    assert len(data["kernels"]["attention_fwd"]) == writers * per_writer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tuning.entries(path)["attention_fwd"]) == writers * per_writer
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left behind


@pytest.mark.parametrize("kernels,match", [
    ({"attention_fwd_v0": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}}, "no kernel 'attention_fwd_v0'"),
    ({"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, BLOCK_X=2)}}, "unknown parameter"),
    ({"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": {"block_m": 64}}}, "missing parameter"),
    ({"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, block_m=48)}}, "invalid value"),
    ({"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, num_warps="8")}}, "invalid value"),
    ({"attention_fwd": {"dtype=fp16,d=64,seq=256": FWD_CFG}}, "bucket fields are not"),
])
def test_stale_or_malformed_entry_is_ignored_with_a_warning(files, as_on_gpu, kernels, match):
    _, shipped = files
    kernels = dict(kernels)
    kernels.setdefault("attention_bwd_dq", {"dtype=fp16,d=64,causal=0,seq=256": {
        "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}})
    _write(shipped, H100, kernels)
    with pytest.warns(tuning.TuningConfigWarning, match=match):
        got, default = _pick_fwd()
    assert got is default
    # the file's valid entries still apply
    dq = tuning.pick("attention_bwd_dq", ATTN, tattn._Config(128, 32, 4, 3), like=torch.empty(1))
    assert dq == tattn._Config(64, 64, 4, 1)


@pytest.mark.parametrize("key,match", [
    ("dtype=fp16,d=64,causal=0,seq=256 ", "whitespace in the bucket key"),
    ("dtype=fp16, d=64,causal=0,seq=256", "whitespace in the bucket key"),
    ("dtype=fp16,d=64,causal=0,seq=abc", r"seq='abc' \(must be a positive integer\)"),
    ("dtype=fp16,d=64,causal=0,seq=", r"seq='' \(must be a positive integer\)"),
    ("dtype=fp16,d=64,causal=0,seq=-256", r"seq=-256 \(must be a positive integer\)"),
    ("dtype=fp16,d=64,causal=0,seq=0", r"seq=0 \(must be a positive integer\)"),
    ("dtype=fp16,d=x,causal=0,seq=256", r"d='x' \(must be a positive integer\)"),
    ("dtype=fp16,d=64,causal=2,seq=256", r"causal=2 \(must be 0 or 1\)"),
    ("dtype=fp8,d=64,causal=0,seq=256", r"dtype='fp8' \(must be one of bf16, fp16, fp32\)"),
    ("dtype=fp16,d=64,causal=0,seq=0256", "not written canonically"),
    ("dtype=fp16,d=64,causal=0,seq=２５６", "positive integer"),  # non-ASCII digits
])
def test_malformed_bucket_key_is_dropped_at_load_and_the_nearest_lookup_falls_back(files, as_on_gpu, key, match):
    """One bad key must not break lookups that go to the nearest bucket (500 tokens: bucket 512, not in the file):
    the entry is dropped when the file loads, with one warning naming the file and the key; the default runs, and the
    file's valid entries still apply."""
    _, shipped = files
    path = _write(shipped, H100, {"attention_fwd": {key: FWD_CFG},
                                  "attention_bwd_dq": {"dtype=fp16,d=64,causal=0,seq=256": {
                                      "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, default = _pick_fwd(dict(ATTN, lq=500, lk=500))
    ours = [w for w in caught if issubclass(w.category, tuning.TuningConfigWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert str(path) in message and f"[{key}]" in message
    assert re.search(match, message), message
    assert got is default
    got, default = _pick_fwd(dict(ATTN, causal=True))  # another nearest lookup: no error, no new warning
    assert got is default
    dq = tuning.pick("attention_bwd_dq", dict(ATTN, lq=500, lk=500), tattn._Config(128, 32, 4, 3),
                     like=torch.empty(1))
    assert dq == tattn._Config(64, 64, 4, 1)  # nearest (256) of a valid entry, blocks kept for 500 rows


@pytest.mark.parametrize("kernel,key,cfg", [
    ("moe_grouped_gemm", "dtype=bf16,gated=1,m=64,n=1024,k=-4096,tpe=256",
     {"block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3}),
    ("moe_grouped_wgrad", "dtype=bf16,m=4096,n=1024,tpe=25 6",
     {"block_m": 64, "block_n": 64, "block_r": 32, "num_warps": 4, "num_stages": 2}),
    ("patch_embed_fwd", "dtype=bf16,m=2048,n=nan,k=1024",
     {"BM": 64, "BN": 128, "BK": 32, "num_warps": 4, "num_stages": 3}),
    ("qformer_fwd", "dtype=bf16,m=32,d=64,seq=1e3", {"block_n": 64, "num_warps": 4, "num_stages": 2}),
])
def test_bucket_rule_covers_every_kernel(files, kernel, key, cfg):
    _, shipped = files
    path = _write(shipped, H100, {kernel: {key: cfg}})
    with pytest.warns(tuning.TuningConfigWarning, match="invalid bucket value|whitespace"):
        assert tuning.entries(path) == {}


@pytest.mark.parametrize("kernel,cfg,bad", [
    ("attention_fwd", dict(FWD_CFG, block_m=1024), "block_m=1024 (must be a power of two in 16...128)"),
    ("attention_fwd", dict(FWD_CFG, block_n=256), "block_n=256 (must be a power of two in 16...128)"),
    ("attention_bwd_dq", dict(FWD_CFG, block_n=128), "block_n=128 (must be a power of two in 16...64)"),
])
def test_block_larger_than_the_space_is_rejected_at_load(files, as_on_gpu, kernel, cfg, bad):
    """A 1024-row tile is a power of two, but no card runs it (OutOfResources): blocks stop at the space's largest."""
    _, shipped = files
    path = _write(shipped, H100, {kernel: {"dtype=fp16,d=64,causal=0,seq=256": cfg}})
    with pytest.warns(tuning.TuningConfigWarning) as record:
        assert tuning.entries(path) == {}
    assert any(bad in str(w.message) and str(path) in str(w.message) for w in record), [str(w.message) for w in record]


def test_every_tuned_default_is_a_valid_file_entry():
    """What ``tune`` writes when nothing beats the default must load again: every hand default fits the space."""
    for kernel, space in tuning.SPACES.items():
        for shape in tune_cases(kernel):
            key = tuning.bucket_key(kernel, shape)
            assert tuning._entry_problem(space, key, space.default_params(shape)) is None, (kernel, key)


# ---- autotune switch ----------------------------------------------------------------------------------------------


def test_no_tuning_unless_mmkernels_autotune_is_on(files, as_on_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "_can_autotune", lambda like: True)
    monkeypatch.setattr(tuning, "_autotune", lambda *a: calls.append(a) or dict(FWD_CFG))
    for value in (None, "", "0", "false", "off"):
        if value is None:
            monkeypatch.delenv("MMKERNELS_AUTOTUNE", raising=False)
        else:
            monkeypatch.setenv("MMKERNELS_AUTOTUNE", value)
        got, default = _pick_fwd()
        assert got is default
    assert calls == []
    for n, value in enumerate(("1", "true", "ON"), 1):
        monkeypatch.setenv("MMKERNELS_AUTOTUNE", value)
        got, _ = _pick_fwd()
        assert got == tattn._Config(64, 32, 8, 2) and len(calls) == n
    for value in ("2", "maybe", "-1"):  # a value the parser does not know is an error naming the variable
        monkeypatch.setenv("MMKERNELS_AUTOTUNE", value)
        with pytest.raises(ValueError, match=f"MMKERNELS_AUTOTUNE='{value}' is not valid"):
            _pick_fwd()


def test_autotune_never_runs_on_cpu_tensors_under_the_interpreter_or_while_tracing(files, monkeypatch):
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "sweep", lambda *a, **k: pytest.fail("tuned"))
    got, default = _pick_fwd()  # interpreter
    assert got is default
    assert not tuning._can_autotune(torch.empty(1))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(1))
    assert not tuning._can_autotune(fake)


def test_autotune_tunes_a_missing_bucket_once_and_saves_it(files, as_on_gpu, monkeypatch):
    user, _ = files
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_can_autotune", lambda like: True)
    monkeypatch.setattr(tuning.Target, "of", staticmethod(lambda device=None: tuning.SM90))
    sweeps = []

    def fake_sweep(space, shape, device, *, default, target, deadline):
        sweeps.append(tuning.bucket_key(space.kernel, shape))
        return tuning.BucketResult(tuning.bucket_key(space.kernel, shape), dict(FWD_CFG), 1.0, 2.0, 3, 9, {}, True)

    monkeypatch.setattr(tuning, "sweep", fake_sweep)
    for _ in range(3):
        got, _ = _pick_fwd()
        assert got == tattn._Config(64, 32, 8, 2)
    assert sweeps == ["dtype=fp16,d=64,causal=0,seq=256"]
    saved = json.loads((user / f"{tuning.device_slug(H100)}.json").read_text())
    assert saved["kernels"]["attention_fwd"]["dtype=fp16,d=64,causal=0,seq=256"]["block_m"] == 64
    tuning.reload()  # a new process reads it from the user file: no second sweep
    got, _ = _pick_fwd()
    assert got == tattn._Config(64, 32, 8, 2) and len(sweeps) == 1


# ---- pruning ------------------------------------------------------------------------------------------------------


def test_pruning_drops_configs_over_the_shared_memory_limit():
    shape = dict(ATTN, dtype=torch.bfloat16, block_d=128, lq=4096, lk=4096)
    space = tuning.SPACES["attention_fwd"]
    big = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4}
    shared, _ = space.estimate(big, space.bucket(shape))
    assert shared == 128 * 128 * 2 + 4 * 2 * 128 * 128 * 2  # q once, K and V per stage
    small_smem = tuning.Target("tiny", shared_per_block=shared - 1)
    kept_small, dropped, total = tuning.candidates("attention_fwd", shape, small_smem)
    kept_big, _, _ = tuning.candidates("attention_fwd", shape, tuning.Target("big", shared_per_block=10**7))
    assert big not in kept_small and big in kept_big
    assert dropped["shared memory"] >= 1 and len(kept_small) + sum(dropped.values()) == total
    for cfg in kept_small:
        assert space.estimate(cfg, space.bucket(shape))[0] <= shared - 1


def test_pruning_drops_register_hungry_and_oversized_blocks():
    kept, dropped, _ = tuning.candidates("attention_bwd_dkdv", dict(ATTN, block_d=128, atomic=True), tuning.SM90)
    assert dropped.get("registers", 0) > 0
    # a 30-token sequence (bucket 32) keeps no block wider than its bucket
    kept, dropped, _ = tuning.candidates("attention_bwd_dq", dict(ATTN, lq=30, lk=30), tuning.SM90)
    assert kept and all(c["block_m"] <= 32 and c["block_n"] <= 32 for c in kept)
    assert dropped["block_m > seq bucket"] > 0


def test_candidates_start_next_to_the_default():
    default = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}
    kept, _, _ = tuning.candidates("attention_fwd", ATTN, tuning.SM90, default)
    assert kept[0] == default
    assert sum(kept[1][k] != default[k] for k in default) == 1


# ---- the sweep (everything but real timing) ------------------------------------------------------------------------


def test_sweep_through_the_real_launcher_rejects_wrong_results_and_keeps_the_fastest(monkeypatch):
    """Under the interpreter, forced configs really run; a fake timer decides speed, a corrupted candidate must be
    rejected by the correctness check, never timed."""
    space = tuning.SPACES["attention_fwd"]
    shape = dict(dtype=torch.float16, head_dim=16, block_d=16, causal=True, lq=37, lk=37)
    default = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}
    configs = [{"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1},   # correct, "fast"
               {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1},   # correct, "slow"
               {"block_m": 16, "block_n": 16, "num_warps": 2, "num_stages": 1}]   # corrupted below
    real = tattn.attention_fwd_per_sequence
    launched = []

    def recording(*args, **kwargs):  # what the sweep launched, and a wrong answer for the num_warps=2 candidate
        cfg = tuning._local.forced["attention_fwd"]
        launched.append(None if cfg is tuning._DEFAULT else cfg)
        out, lse = real(*args, **kwargs)
        return (out + 1 if cfg is not tuning._DEFAULT and cfg["num_warps"] == 2 else out), lse

    monkeypatch.setattr(tattn, "attention_fwd_per_sequence", recording)
    timed = []

    def fake_timer(fn):
        fn()
        cfg = launched[-1]
        timed.append(cfg)
        return 1.0 if cfg is None else {32: 0.5, 16: 0.9}[cfg["block_m"]]

    result = tuning.sweep(space, shape, torch.device("cpu"), default=default, timer=fake_timer, configs=configs,
                          small=True)
    assert result.config == configs[0] and result.ms == 0.5 and result.default_ms == 1.0
    assert result.rejected == {"wrong result": 1}
    assert timed == [None, configs[0], configs[1]]  # the default first; the corrupted candidate never timed
    assert result.tried == 3 and result.complete


def test_sweep_keeps_the_default_when_nothing_beats_it_beyond_noise():
    space = tuning.SPACES["moe_grouped_wgrad"]
    shape = dict(dtype=torch.float32, m=16, n=32, experts=2, tiles=4, block_m=32)
    default = {"block_m": 32, "block_n": 64, "block_r": 32, "num_warps": 4, "num_stages": 2}
    configs = [{"block_m": 16, "block_n": 32, "block_r": 16, "num_warps": 4, "num_stages": 1}]
    calls = iter([1.0, 0.99])  # default 1.0 ms, candidate 0.99 ms: within the 2% noise margin
    result = tuning.sweep(space, shape, torch.device("cpu"), default=default, timer=lambda fn: next(calls),
                          configs=configs, small=True)
    assert result.config == default and result.ms == 1.0 and not result.rejected


def test_sweep_stops_at_the_deadline():
    space = tuning.SPACES["moe_grouped_wgrad"]
    shape = dict(dtype=torch.float32, m=16, n=32, experts=2, tiles=4, block_m=32)
    default = {"block_m": 32, "block_n": 64, "block_r": 32, "num_warps": 4, "num_stages": 2}
    configs = [dict(default, block_m=16), dict(default, block_n=32)]
    result = tuning.sweep(space, shape, torch.device("cpu"), default=default, timer=lambda fn: 1.0,
                          configs=configs, small=True, deadline=0.0)
    assert result.tried == 0 and not result.complete and result.config == default


LAUNCH_PARAMS = ("num_warps", "num_stages")  # every other tunable parameter of a space is a block size


def _smallest_other(kernel: str, kept: list[dict], default: dict) -> dict:
    """The smallest kept candidate that is not ``default`` (cheapest under the interpreter): the least product of its
    block sizes, then the fewest warps, then the fewest stages; ties keep ``candidates()``' nearest-to-default order."""
    others = [c for c in kept if c != default]
    assert others, (f"tuning space {kernel!r} keeps no candidate besides its default {default} for its first fp16 "
                    f"tune case: give it a second value of some parameter that the pruning keeps")

    def size(c):
        blocks = [v for k, v in c.items() if k not in LAUNCH_PARAMS]
        return math.prod(blocks), c.get("num_warps", 0), c.get("num_stages", 0)

    return min(others, key=size)


@pytest.mark.parametrize("kernel", sorted(tuning.SPACES) if triton_available() else [])
def test_every_space_runs_its_launcher_with_a_forced_candidate(kernel, monkeypatch):
    """Each kernel's tuning case builds, runs the default and one pruned candidate under the interpreter, and the two
    agree (a candidate that changed the result would be rejected on a card). The candidate is the smallest kept one
    besides the default (:func:`_smallest_other`), so any space a new kernel family registers works here."""
    space = tuning.SPACES[kernel]
    shape = next(s for s in tune_cases(kernel) if s["dtype"] == torch.float16)
    shape = dict(shape, lq=min(shape.get("lq", 1), 40), lk=min(shape.get("lk", 1), 40)) if "lq" in shape else shape
    if space.op == "qformer_cross_attention":
        shape = dict(shape, lk=40)
    default = space.default_params(shape)
    kept, _, _ = tuning.candidates(kernel, shape, tuning.SM90, default)
    other = _smallest_other(kernel, kept, default)
    picked = []
    real_pick = tuning.pick

    def spy(name, shape_, default_, *, like, target=None):
        got = real_pick(name, shape_, default_, like=like, target=target)
        if name == kernel:
            picked.append(tuning._params_of(space, got))
        return got

    monkeypatch.setattr(tuning, "pick", spy)
    result = tuning.sweep(space, shape, torch.device("cpu"), default=default, timer=lambda fn: 1.0,
                          configs=[other], small=True)
    assert result.rejected == {} and result.tried == 1
    assert other in picked  # the candidate really reached the kernel launch


def test_save_merges_into_an_existing_file(tmp_path):
    path = tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    r1 = tuning.BucketResult("dtype=fp16,d=64,causal=0,seq=256", dict(FWD_CFG), 0.5, 1.0, 3, 9, {}, True)
    r2 = tuning.BucketResult("dtype=fp16,d=64,causal=1,seq=256", dict(FWD_CFG, num_warps=4), 0.5, 1.0, 3, 9, {},
                             False)
    tuning.save(path, H100, [("attention_fwd", r1)])
    tuning.save(path, H100, [("attention_fwd", r2)])
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT and data["device"] == H100
    assert set(data["kernels"]["attention_fwd"]) == {r1.key, r2.key}
    assert data["kernels"]["attention_fwd"][r1.key]["_default_ms"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.entries(path)["attention_fwd"][r2.key] == dict(FWD_CFG, num_warps=4)


def test_tune_writes_after_every_bucket_round_robin_over_kernels(tmp_path, monkeypatch):
    order = []

    def fake_sweep(space, shape, device, **kw):
        order.append(space.kernel)
        return tuning.BucketResult(tuning.bucket_key(space.kernel, shape), kw["default"], 1.0, 1.0, 0, 1, {}, True)

    monkeypatch.setattr(tuning, "sweep", fake_sweep)
    out = tmp_path / "x.json"
    results = bench_tune.tune(["qformer_fwd", "qformer_bwd"], device=torch.device("cpu"), budget=60, out=out,
                          name=H100, dtypes=[torch.float16], report=lambda line: None)
    assert order == ["qformer_fwd", "qformer_bwd", "qformer_fwd", "qformer_bwd"]
    assert len(json.loads(out.read_text())["kernels"]["qformer_fwd"]) == 2
    order.clear()
    bench_tune.tune(["qformer_fwd"], device=torch.device("cpu"), budget=60, out=out, name=H100,
                dtypes=[torch.float16], report=lambda line: None)
    assert order == [] and len(results) == 4  # already in the file: skipped


# ---- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_dry_run_lists_every_kernel_and_bucket(capsys):
    from mmkernels.bench.cli import main

    assert main(["tune", "all", "--dry-run", "--target", "sm_80"]) == 0
    out = capsys.readouterr().out
    assert "sm_80" in out
    for kernel in tuning.SPACES:
        assert kernel in out
    assert "dtype=bf16,d=64,causal=0,seq=256" in out


def test_cli_dry_run_one_op(capsys):
    from mmkernels.bench.cli import main

    assert main(["tune", "qformer_cross_attention", "--dry-run", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "qformer_fwd" in out and "attention_fwd" not in out and "bf16" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_a_gpu_exits_2_with_a_clear_message(capsys):
    from mmkernels.bench.cli import main

    assert main(["tune", "attention", "--budget", "5"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("dtypes", [["fp32"], ["fp32", "fp16"], ["fp16", "fp32"]])
def test_cli_refuses_fp32_with_one_line_saying_why(capsys, dtypes):
    from mmkernels.bench.cli import main

    assert main(["tune", "all", "--dry-run", "--dtype", *dtypes]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and "fp32 is not tuned" in err and "fixed default configs" in err


@pytest.mark.parametrize("budget", ["inf", "-inf", "nan", "0", "-5", "abc"])
def test_cli_rejects_a_budget_that_is_not_a_finite_positive_number(capsys, budget):
    from mmkernels.bench.cli import main

    assert main(["tune", "attention", "--dry-run", f"--budget={budget}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "must be a finite positive number" in err


def test_cli_rejects_unknown_ops(capsys):
    from mmkernels.bench.cli import main

    assert main(["tune", "attentoin", "--dry-run"]) == 2
    assert "unknown op or kernel 'attentoin'" in capsys.readouterr().err


# ---- compile ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
def test_op_compiles_fullgraph_with_the_lookup_in_its_path(files, dynamic, monkeypatch):
    """A tuning file for this device and MMKERNELS_AUTOTUNE=1 change nothing for torch.compile: the lookup is host
    Python inside the op (no graph break), and the interpreter takes the default config."""
    user, _ = files
    _write(user, H100, {"attention_fwd": {"dtype=fp32,d=16,causal=1,seq=64": FWD_CFG}})
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "1")
    q, k, v = (torch.randn(2, 37, 2, 16) for _ in range(3))
    fn = lambda q, k, v: mmkernels.ops.attention(q, k, v, causal=True, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, fn(q, k, v), rtol=0, atol=0)


def test_lookup_traces_with_symbolic_shapes_under_make_fx(files, as_on_gpu):
    """What torch.compile does to a triton_op body on a GPU: run it with fake tensors and symbolic sizes. The lookup
    must return the file's config there too, without reading any tensor data."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _, shipped = files
    _write(shipped, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}})
    seen = []

    def body(q):
        cfg = tuning.pick("attention_fwd", dict(dtype=q.dtype, block_d=64, causal=False, lq=q.shape[1],
                                                lk=q.shape[1]), tattn._Config(128, 64, 4, 3), like=q)
        seen.append(cfg)
        return q * cfg.num_warps

    gm = make_fx(body, tracing_mode="symbolic")(torch.randn(1, 197, 2, 64, dtype=torch.float16))
    assert seen[-1] == tattn._Config(64, 32, 8, 2)
    x = torch.randn(1, 200, 2, 64, dtype=torch.float16)
    torch.testing.assert_close(gm(x), x * 8)


def test_shipped_configs_reach_every_kernel_launch(files, tmp_path, monkeypatch):
    """Through the real launchers, as on a GPU (tests/triton_launches.py records the launches without running them):
    a shipped entry for each kernel family shows up in that kernel's launch constexprs and options."""

    from triton_launches import record_gpu_configs

    _, shipped = files
    _write(shipped, H100, {
        "attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": dict(FWD_CFG, block_n=128, num_stages=4)},
        "attention_bwd_dkdv": {"dtype=fp16,d=64,causal=0,seq=256,atomic=1": {
            "block_m": 16, "block_n": 64, "num_warps": 8, "num_stages": 1}},
        "qformer_fwd": {"dtype=fp16,m=32,d=64,seq=512": {"block_n": 128, "num_warps": 8, "num_stages": 4}},
        "patch_embed_fwd": {"dtype=fp16,m=2048,n=1024,k=1024": {
            "BM": 64, "BN": 256, "BK": 32, "num_warps": 4, "num_stages": 4}},
        "moe_grouped_gemm": {"dtype=fp16,gated=1,m=64,n=1024,k=4096,tpe=256": {
            "block_n": 256, "block_k": 32, "num_warps": 4, "num_stages": 4}},
        "moe_grouped_wgrad": {"dtype=fp16,m=4096,n=1024,tpe=256": {
            "block_m": 128, "block_n": 64, "block_r": 32, "num_warps": 4, "num_stages": 2}},
    })
    # record_gpu_configs patches the interpreter (record, don't run) for the whole process: undo it after (the GPU
    # target it assumes ends with it)
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)
    path = tmp_path / "launches.jsonl"
    path.write_text("")
    record_gpu_configs(str(path))
    launched = set()
    for line in path.read_text().splitlines():
        spec = json.loads(line)
        blocks = tuple(sorted((k, v) for k, v in spec["constexprs"].items() if k.startswith("BLOCK")))
        launched.add((spec["kernel"], blocks, spec["options"].get("num_warps"), spec["options"].get("num_stages")))

    def has(kernel, warps, stages, **blocks):
        return any(k == kernel and w == warps and s == stages and set(blocks.items()) <= set(b)
                   for k, b, w, s in launched)

    assert has("_attn_fwd_kernel", 8, 4, BLOCK_M=64, BLOCK_N=128)
    assert has("_attn_bwd_dkdv_kernel", 8, 1, BLOCK_M=16, BLOCK_N=64)
    assert has("_qf_fwd_kernel", 8, 4, BLOCK_M=32, BLOCK_N=128)
    assert has("_patch_embed_fwd_kernel", 4, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32)
    assert has("_grouped_gemm_kernel", 4, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32)
    assert has("_grouped_wgrad_kernel", 4, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_R=32)
    # and the defaults elsewhere (no fp32 entries): the fp32 forward keeps its hand config
    assert has("_attn_fwd_kernel", 4, 2, BLOCK_M=32, BLOCK_N=32)


@pytest.mark.parametrize("blocker", ["lock-is-a-folder", "parent-is-a-file", "proc"])
def test_save_reports_the_real_error_at_once_naming_the_path(tmp_path, monkeypatch, blocker):
    """A folder that cannot take the lock file used to wait LOCK_TIMEOUT_S and then blame "another process": the real
    error comes at once, and every save error names the file being saved."""
    import os
    import time
    from pathlib import Path

    monkeypatch.setattr(tuning, "LOCK_TIMEOUT_S", 30.0)
    if blocker == "lock-is-a-folder":
        path = tmp_path / "x.json"
        (tmp_path / "x.json.lock").mkdir()
        match = "lock file .*x.json.lock"
    elif blocker == "proc":  # a folder no file can be created in: filelock retried ENOENT until its timeout
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs Linux /proc")
        path = Path("/proc/self/mmkernels_x.json")
        match = "lock file /proc/self/mmkernels_x.json.lock"
    else:
        (tmp_path / "a_file").write_text("x")
        path = tmp_path / "a_file" / "x.json"
        match = "cannot save .*a_file/x.json"
    result = tuning.BucketResult("dtype=fp16,d=64,causal=0,seq=256", dict(FWD_CFG), 0.5, 1.0, 3, 9, {}, True)
    start = time.monotonic()
    with pytest.raises(OSError, match=match) as exc:
        tuning.save(path, H100, [("attention_fwd", result)])
    assert time.monotonic() - start < 5, "waited for a lock no process holds"
    assert "another process" not in str(exc.value)
    assert not path.exists()


# ---- the core knows no kernel (issue 20) --------------------------------------------------------------------------


def _triton_package():
    from pathlib import Path

    import mmkernels.kernels.triton as package

    return Path(package.__file__).parent


def _imports(path):
    """(module-level?, imported module names relative to mmkernels.kernels.triton or absolute) for every import
    statement of ``path``, at any depth."""
    import ast

    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(id(node) in top, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import a / from .a import x: modules of this package
                names = [node.module] if node.module else [alias.name for alias in node.names]
                out += [(id(node) in top, f".{name.split('.')[0]}") for name in names]
            else:
                out.append((id(node) in top, "." * node.level + (node.module or "")))
    return out


def test_tuning_core_imports_no_kernel_module_and_nothing_inside_functions():
    """The core imports no module of its package (no kernel, not even _common) and every import is at module level."""
    found = _imports(_triton_package() / "tuning.py")
    assert [name for top, name in found if not top] == []
    assert [name for _, name in found if name.startswith(".") and not name.startswith("..")] == []
    assert not any("kernels.triton" in name for _, name in found)


def test_no_import_circle_among_the_triton_kernel_modules():
    """Every module of kernels/triton (imports at any depth, the package __init__ aside): no circle; the per-sequence
    and packed attention kernels do not import each other (attention_varlen decides between them)."""
    folder = _triton_package()
    modules = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for _, imported in _imports(path):
            if imported.startswith(".") and not imported.startswith(".."):
                deps.add(imported[1:])
            elif imported.startswith("mmkernels.kernels.triton."):
                deps.add(imported.split(".")[3])
        graph[name] = deps & set(modules)
    assert "attention_packed" not in graph["attention"] and "attention" not in graph["attention_packed"]
    assert {"attention", "attention_packed"} <= graph["attention_varlen"]
    assert graph["tuning"] == set()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_every_registered_space_has_tune_cases_and_a_default_on_every_case():
    from mmkernels.bench.tune_cases import CASES

    assert set(tuning.SPACES) == set(CASES)
    assert {s.op for s in tuning.SPACES.values()} == set(tuning.OPS)
    for kernel, space in tuning.SPACES.items():
        assert space.module.startswith("mmkernels.kernels.triton.") and callable(space.make)
        assert getattr(space.jit, "__name__", None) or getattr(space.jit, "fn", None), kernel


def test_register_rejects_what_is_not_a_consistent_space():
    space = tuning.SPACES["qformer_fwd"]
    with pytest.raises(TypeError, match="space must be a tuning.Space"):
        tuning.register({"kernel": "x"})
    import dataclasses

    for bad in (dict(key_fields=("m", "dtype", "d", "seq")), dict(ordered=("lk",)), dict(flags=("causal",)),
                dict(limits={"block_n": "lk"})):
        with pytest.raises(ValueError, match="key_fields"):
            tuning.register(dataclasses.replace(space, kernel="qformer_fwd_bad", **bad))
    assert "qformer_fwd_bad" not in tuning.SPACES


def test_the_target_reaches_every_config_choice_of_every_family():
    """Config functions take an explicit target: interpreter tiles vs GPU tiles, and the SM count of the target in
    every split choice (Q-Former key splits, patch-embedding weight and token gradient splits)."""
    import dataclasses

    from mmkernels.kernels.triton import _common
    from mmkernels.kernels.triton import attention_packed as tpacked

    cpu = torch.empty(1, 32, 2, 64, dtype=torch.float16)
    assert tuning.target_of(cpu) is tuning.INTERPRETER and _common.interpreted(cpu)
    with tuning.assume_target(tuning.SM80):
        assert tuning.target_of(cpu) is tuning.SM80 and not _common.interpreted(cpu)
    assert tuning.target_of(cpu) is tuning.INTERPRETER
    small = dataclasses.replace(tuning.SM90, sm_count=8)
    # attention (per sequence and packed)
    assert tattn._fwd_config(64, torch.float16, 197, 197, tuning.INTERPRETER) == tattn._Config(64, 64, 4, 1)
    assert tattn._fwd_config(64, torch.float16, 197, 197, tuning.SM90) == tattn._Config(128, 32, 8, 3)
    assert tattn._bwd_configs(128, torch.float16, 197, 197, tuning.SM90) == (tattn._Config(16, 32, 8, 1),
                                                                             tattn._Config(16, 32, 4, 2))
    assert tpacked._configs(80, torch.float16, tuning.INTERPRETER)[0] == tpacked._Config(32, 32, 4, 1)
    assert tpacked._configs(80, torch.float16, tuning.SM90)[0] == tpacked._Config(64, 32, 4, 2)
    q32 = torch.empty(10, 2, 40, dtype=torch.float32)
    assert tpacked.packed_fits(q32, False, tuning.INTERPRETER) and not tpacked.packed_fits(q32, False, tuning.SM90)
    # Q-Former: 1 x 2 programs, 4096 keys in 64 tiles of 64
    assert tqf._config(32, 64, torch.float16, tuning.INTERPRETER, False) == (64, 4, 1)
    assert tqf._config(32, 64, torch.float16, tuning.SM90, False) == (64, 8, 2)
    assert tqf.num_key_splits(cpu, 4096, 64, 0, tuning.INTERPRETER) == 1
    assert tqf.num_key_splits(cpu, 4096, 64, 0, tuning.SM90) == 64  # min(64 tiles, 2 * 132 / 2)
    assert tqf.num_key_splits(cpu, 4096, 64, 0, small) == 8  # 2 * 8 / 2
    assert tqf.num_key_splits(cpu, 4096, 64) == 1  # the tensor's own target: the interpreter
    # patch embedding
    assert tpatch._gemm_config(tuning.INTERPRETER, torch.float16, 1576, 768, 768)["num_stages"] == 1
    assert tpatch._weight_grad_splits(tuning.INTERPRETER, 4, 800, 64) == 1
    assert tpatch._weight_grad_splits(tuning.SM90, 4, 800, 64) == 64  # min(2 * 132 / 4, 800 / 8, 64)
    assert tpatch._weight_grad_splits(small, 4, 800, 64) == 4  # 2 * 8 / 4
    assert tpatch._token_grad_splits(tuning.SM90, 10, 64) == 8  # min(4 * 132 / 10, 64 / 8)
    assert tpatch._token_grad_splits(small, 10, 64) == 4  # 4 * 8 / 10
    assert tpatch._token_grad_splits(tuning.INTERPRETER, 10, 64) == 1


def test_pick_takes_an_explicit_target(files):
    """An explicit GPU target makes a CPU-tensor lookup use the file (the device name comes from the env); an
    interpreted one always gets the default, whatever the tensor."""
    _, shipped = files
    _write(shipped, H100, {"attention_fwd": {"dtype=fp16,d=64,causal=0,seq=256": FWD_CFG}})
    default = tattn._Config(128, 64, 4, 3)
    like = torch.empty(1, dtype=torch.float16)
    assert tuning.pick("attention_fwd", ATTN, default, like=like) is default
    assert tuning.pick("attention_fwd", ATTN, default, like=like, target=tuning.SM90) == tattn._Config(64, 32, 8, 2)
    with tuning.assume_target(tuning.SM90):
        assert tuning.pick("attention_fwd", ATTN, default, like=like, target=tuning.INTERPRETER) is default
