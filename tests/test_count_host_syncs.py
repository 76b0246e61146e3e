"""``mmkernels.testing.count_host_syncs``: the counter behind every sync-budget test must see each kind of host read
(and only those), name where it happened, and leave torch as it found it."""

from __future__ import annotations

import pytest
import torch

from mmkernels.testing import count_host_syncs

_READS = {
    "item": lambda t: t.sum().item(),
    "tolist": lambda t: t.tolist(),
    "bool": lambda t: bool(t.sum() > 0),
    "if": lambda t: 1 if (t > 0).any() else 0,
    "int": lambda t: int(t[0]),
    "float": lambda t: float(t[0]),
    "index": lambda t: [0, 1, 2][t[0].long()],
    "nonzero": lambda t: t.nonzero(),
    "torch.nonzero": lambda t: torch.nonzero(t),
    "unique": lambda t: torch.unique(t),
    "masked_select": lambda t: torch.masked_select(t, t > 0),
    "equal": lambda t: torch.equal(t, t),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "boolean-mask index": lambda t: t[t > 0],
}


@pytest.mark.parametrize("name", list(_READS))
def test_each_kind_of_host_read_counts_once(name):
    t = torch.tensor([0.5, -1.0, 2.0])
    with count_host_syncs() as syncs:
        _READS[name](t)
    assert syncs.count == 1, syncs.calls
    assert __file__ in syncs.calls[0]


def test_device_side_work_counts_nothing():
    t = torch.randn(4, 5)
    with count_host_syncs() as syncs:
        u = torch.where(t > 0, t, 0.0).cumsum(0)
        u[:, 1:3] = u[:, :2] * 2
        torch.zeros(3)[torch.tensor([0, 2])]  # integer indexing: no host read
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]), output_size=3)
    assert syncs.count == 0, syncs.calls


def test_torch_is_restored_and_nesting_counts_in_both():
    before = (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero)
    t = torch.ones(2)
    with count_host_syncs() as outer:
        with count_host_syncs() as inner:
            t.tolist()
        t.item() if t.numel() == 1 else t[0].item()
    assert inner.count == 1 and outer.count == 2
    assert (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero) == before


def test_calls_from_skipped_packages_do_not_count():
    t = torch.ones(2)
    with count_host_syncs(skip=("tests", "test_count_host_syncs")) as syncs:
        t.tolist()
    assert syncs.count == 0


def test_code_that_builds_tensors_from_0d_tensors_runs_unchanged():
    """transformers' Qwen-VL rope index does ``torch.tensor([0-d tensors])``: the counter must not change what such
    code does (a Python ``Tensor.__getitem__`` on the class made torch treat each 0-d tensor as a sequence)."""
    parts = [torch.tensor(3), torch.tensor(4)]
    with count_host_syncs() as syncs:
        built = torch.tensor(parts)
        masked = torch.arange(4)[torch.tensor([True, False, True, False])]
    assert built.tolist() == [3, 4] and masked.tolist() == [0, 2]
    # each element read once (on a GPU, one wait each), and the mask index
    assert [c.split(" at ")[0] for c in syncs.calls] == ["__index__", "__index__", "boolean-mask index"], syncs.calls
