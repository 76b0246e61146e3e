"""`mmkernels-bench hf` for the native-resolution vision towers (issue 22): Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
InternVL. The realistic configs are checked on the meta device (nothing allocated), the tiny ones run end to end
through the CLI, and the host syncs it reports are checked against a count taken here around the same forward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmkernels.bench.cli import main
from mmkernels.bench.hf import MODEL_OPS, MODELS
from mmkernels.testing import count_host_syncs

pytest.importorskip("transformers")

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOWERS = (*QWEN, "internvl")

# The published towers (--size realistic): (config attribute, value) pairs.
REALISTIC = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, temporal_patch_size=2,
                     spatial_merge_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    "qwen3_vl": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, patch_size=16,
                     temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                     deepstack_visual_indexes=[8, 16, 24]),
    "internvl": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                     image_size=(448, 448), patch_size=(14, 14)),
}


def _build(name: str, tiny: bool):
    if tiny:
        torch.manual_seed(0)
        return MODELS[name](True)
    with torch.device("meta"):  # the config and the shapes, without allocating ~700M parameters
        return MODELS[name](False)


@pytest.mark.parametrize("name", TOWERS)
def test_realistic_towers_are_the_published_shapes(name):
    model, inputs, _, batch = _build(name, tiny=False)
    cfg = model.config
    for key, value in REALISTIC[name].items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, (list, tuple)) else value), (name, key, got)
    if name == "internvl":
        assert inputs("cpu", torch.float32)["pixel_values"].shape == (7, 3, 448, 448)
        assert batch == "7 tiles of 448x448"
        return
    assert cfg.num_heads and cfg.num_heads == 16
    x = inputs("cpu", torch.float32)
    # Qwen2.5-VL's batch as issue 22 gives it (pixels at patch 14); Qwen3-VL has the same patch grids at patch 16.
    sizes = {14: "448x448, 644x812, 1092x728, video 4 x 336x588", 16: "512x512, 736x928, 1248x832, video 4 x 384x672"}
    assert batch == f"{sizes[cfg.patch_size]}: 9764 patches"
    assert x["grid_thw"].tolist() == [[1, 32, 32], [1, 46, 58], [1, 78, 52], [2, 24, 42]]
    assert x["hidden_states"].shape == (9764, 3 * 2 * cfg.patch_size ** 2)


def _windows(grid_thw, window_px: int, patch: int, merge: int) -> int:
    """Qwen2.5-VL's window count, from its definition: windows of window_px // patch patches a side (a whole number
    of merge blocks), per frame, the last row and column of windows cut short."""
    side = window_px // merge // patch * merge
    return sum(t * math.ceil(h / side) * math.ceil(w / side) for t, h, w in grid_thw)


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "realistic"])
def test_qwen_batches_are_native_resolution_images_and_a_video(name, tiny):
    """Several images of different sizes plus one 4-frame video (t=2 after the temporal patch), each grid a whole
    number of merge blocks; in Qwen2.5-VL the windows really split the images and both window and full layers run."""
    model, inputs, output, _ = _build(name, tiny)
    cfg = model.config
    x = inputs("cpu", torch.float32)
    grid = x["grid_thw"].tolist()
    images = [tuple(g) for g in grid if g[0] == 1]
    videos = [tuple(g) for g in grid if g[0] != 1]
    assert len(images) >= 2 and len(set(images)) == len(images) and [v[0] for v in videos] == [2]
    assert all(h % cfg.spatial_merge_size == 0 and w % cfg.spatial_merge_size == 0 for _, h, w in grid)
    assert x["grid_thw"].dtype == torch.long
    assert x["hidden_states"].shape == (sum(t * h * w for t, h, w in grid),
                                        cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    if tiny:  # head dim 16 or 20, a few layers
        assert (cfg.embed_dim if name == "qwen2_vl" else cfg.hidden_size) // cfg.num_heads in (16, 20)
        assert cfg.depth <= 4
    if name == "qwen2_5_vl":
        full = set(cfg.fullatt_block_indexes)
        assert full and full < set(range(cfg.depth)), "both window and full-attention layers"
        windows = _windows(grid, cfg.window_size, cfg.patch_size, cfg.spatial_merge_size)
        assert windows > 2 * len(grid), "windows split the images"
        try:  # the installed transformers agrees on the windows
            from transformers.vision_utils import get_vision_window_index
        except ImportError:
            cu = model.get_window_index(x["grid_thw"])[1]
        else:
            cu = get_vision_window_index(x["grid_thw"], cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)[1]
        assert len(cu) - 1 == windows
    if tiny:  # the output is the merged tokens (plus Qwen3-VL's deepstack features), what the language model gets
        with torch.no_grad():
            out = output(model(**x))
        merged = x["hidden_states"].shape[0] // cfg.spatial_merge_size ** 2
        stacks = 1 + len(getattr(cfg, "deepstack_visual_indexes", []) or [])
        assert out.shape == (stacks * merged, cfg.out_hidden_size if name != "qwen2_vl" else cfg.hidden_size)


def _syncs(model, inputs, output, grad: bool) -> int:
    x = inputs("cpu", torch.float32)
    with torch.set_grad_enabled(grad), count_host_syncs() as syncs:
        output(model(**x))
    return syncs.count


@pytest.mark.parametrize("name", TOWERS)
def test_cli_writes_timings_and_host_syncs_per_forward(name, tmp_path, capsys):
    """The command runs the tiny tower patched and unpatched and writes every row's host syncs per forward; the
    counts are the ones taken here around one forward of the same model (unpatched, then patched and warmed up)."""
    from mmkernels.integrations.hf import patch, unpatch

    assert main(["hf", "--model", name, "--warmup-ms", "0", "--rep-ms", "0", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "syncs/fwd" in text and "ratio" in text
    data = json.loads((tmp_path / f"hf_{name}.json").read_text())
    rows = {(r["mode"], r["provider"]): r for r in data["rows"]}
    assert set(rows) == {(m, p) for m in ("fwd", "fwd+bwd") for p in ("unpatched", "patched")}
    for (mode, provider), row in rows.items():
        assert row["median_ms"] > 0 and row["model"] == name and row["size"] == "tiny"
        assert row["host_syncs_per_fwd"] == sum(data["host_sync_sites"][provider][mode].values())
    assert data["input"] == _build(name, True)[3]

    model, inputs, output, _ = _build(name, True)
    model = model.eval()
    expect = {("fwd", "unpatched"): _syncs(model, inputs, output, False),
              ("fwd+bwd", "unpatched"): _syncs(model, inputs, output, True)}
    patch(model)
    try:
        _syncs(model, inputs, output, False)  # warm-up: first-call work is not counted by the bench either
        expect[("fwd", "patched")] = _syncs(model, inputs, output, False)
        expect[("fwd+bwd", "patched")] = _syncs(model, inputs, output, True)
    finally:
        unpatch(model)
    assert {k: r["host_syncs_per_fwd"] for k, r in rows.items()} == expect
    if name in QWEN:  # HF's own code reads grid_thw on the host: a count of 0 would mean nothing was counted
        assert expect[("fwd", "unpatched")] > 0


def test_every_model_has_its_ops_declared():
    """MODEL_OPS (what --backend is checked against) names every model of the table."""
    assert set(MODEL_OPS) == set(MODELS)
