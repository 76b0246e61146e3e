"""The fan-out ``ModuleBackend``: a composite module's ``backend`` reaches each part with its share of the choice,
the whole choice is checked before any part changes, and a part running undeclared ops is a programming error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkernels._backends import BackendError, ModuleBackend, backend_parts
from mmkernels.nn import Attention, PatchEmbed


class _Leaf(nn.Module):
    backend = ModuleBackend("attention")

    def __init__(self, backend=None) -> None:
        super().__init__()
        self.backend = backend


class _Pair(nn.Module):
    backend = ModuleBackend("attention", "patch_embed")

    def __init__(self, backend=None) -> None:
        super().__init__()
        self.attn = nn.ModuleList([_Leaf(), _Leaf()])
        self.wrapped = nn.Sequential(nn.Identity(), _Leaf())  # found below a module without a backend
        self.embed = PatchEmbed(image_size=8, patch_size=4, in_channels=3, embed_dim=8)
        self.backend = backend


class _Outer(nn.Module):
    backend = ModuleBackend("attention", "patch_embed")

    def __init__(self, backend=None) -> None:
        super().__init__()
        self.pair = _Pair()
        self.backend = backend


def _leaves(m):
    return [x for x in m.modules() if isinstance(x, _Leaf)]


def test_a_name_reaches_every_part_as_given():
    m = _Outer("reference")
    assert [x.backend for x in _leaves(m)] == ["reference"] * 3
    assert m.pair.backend == "reference" and m.pair.embed.backend == "reference"
    m.backend = None
    assert [x.backend for x in _leaves(m)] == [None] * 3 and m.pair.embed.backend is None


def test_a_mapping_is_shared_out_per_op():
    m = _Outer({"attention": "reference"})
    assert [x.backend for x in _leaves(m)] == ["reference"] * 3  # a part of one op gets that op's entry
    assert m.pair.embed.backend is None
    assert m.pair.backend == {"attention": "reference", "patch_embed": None}
    assert m._backends == {"attention": "reference", "patch_embed": None}


def test_the_whole_choice_is_checked_before_any_part_changes():
    m = _Outer("reference")
    with pytest.raises(BackendError, match="patch_embed"):
        m.backend = {"attention": "reference", "patch_embed": "no-such"}
    with pytest.raises(BackendError, match="does not run"):
        m.backend = {"moe_route": "reference"}
    assert [x.backend for x in _leaves(m)] == ["reference"] * 3 and m.backend == "reference"


def test_parts_are_the_nearest_carriers():
    m = _Outer()
    assert list(backend_parts(m)) == [m.pair]
    assert list(backend_parts(m.pair)) == [*m.pair.attn, m.pair.wrapped[1], m.pair.embed]
    assert list(backend_parts(Attention(16, 2))) == []


def test_a_part_running_undeclared_ops_is_refused():
    class Narrow(nn.Module):
        backend = ModuleBackend("patch_embed")

        def __init__(self) -> None:
            super().__init__()
            self.attn = _Leaf()
            self.backend = None

    with pytest.raises(TypeError, match="does not declare"):
        Narrow()


def test_the_descriptor_must_be_named_backend_and_name_an_op():
    with pytest.raises((TypeError, RuntimeError)):
        class Misnamed(nn.Module):  # noqa: F841
            choice = ModuleBackend("attention")
    with pytest.raises(TypeError, match="at least one op"):
        ModuleBackend()


def test_state_survives_deepcopy_and_pickle():
    import copy
    import io

    m = _Outer({"attention": "reference"})
    for clone in (copy.deepcopy(m), torch.load(_saved(m, io), weights_only=False)):
        assert clone.backend == {"attention": "reference"}
        assert [x.backend for x in _leaves(clone)] == ["reference"] * 3


def _saved(m, io):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf
