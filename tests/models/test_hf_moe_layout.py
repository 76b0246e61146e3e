"""The one tolerant layer that reads HF MoE structure (``mmkernels.models.convert._hf_moe.moe_layout``), used by the
LongCat converter and by ``patch``: every family, the attribute layouts of the supported transformers releases (config
on the block or not, N on the block or on the experts, ``gate_up_proj`` with or without zero-expert rows), simulated
on the installed release by removing what other releases lack. Never an ``AttributeError``: a right answer, or a
``ConversionError`` naming what is missing."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.hf._patching import PatchReport, restore_all  # noqa: E402
from mmkernels.integrations.hf.moe import patch_moe  # noqa: E402
from mmkernels.models.convert._common import ConversionError  # noqa: E402
from mmkernels.models.convert._hf_moe import moe_layout  # noqa: E402
from mmkernels.models.convert.longcat import mmkernels_to_hf  # noqa: E402
from mmkernels.nn import ZeroComputeMoE  # noqa: E402

HIDDEN, INTER = 24, 12


def _longcat():
    from transformers.models.longcat_flash.configuration_longcat_flash import LongcatFlashConfig
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    cfg = LongcatFlashConfig(hidden_size=HIDDEN, n_routed_experts=5, zero_expert_num=3, moe_topk=3,
                             expert_ffn_hidden_size=INTER, routed_scaling_factor=2.5)
    return LongcatFlashMoE(cfg), cfg, dict(num_ffn_experts=5, num_zero_experts=3, top_k=3, routed_scaling_factor=2.5)


def _mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=6, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg), cfg, dict(num_ffn_experts=6, num_zero_experts=0, top_k=2,
                                                 routed_scaling_factor=1.0)


def _deepseek():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=8, n_group=4,
                           topk_group=2, num_experts_per_tok=3, routed_scaling_factor=1.5, norm_topk_prob=False)
    return DeepseekV3MoE(cfg), cfg, dict(num_ffn_experts=8, num_zero_experts=0, top_k=3, routed_scaling_factor=1.5,
                                         n_group=4, topk_group=2, norm_topk_prob=False)


FAMILIES = {"longcat_flash": _longcat, "mixtral": _mixtral, "deepseek_v3": _deepseek}
# attributes that some supported release has and another lacks (or names differently)
RELEASE_ATTRS = ("config", "num_routed_experts", "zero_expert_num", "num_experts", "total_experts")


def _strip(block, names=RELEASE_ATTRS, modules=None):
    """Remove ``names`` from the block and every sub-module (as a release without them would build it)."""
    for m in modules if modules is not None else block.modules():
        for name in names:
            m.__dict__.pop(name, None)


def _check(layout, expected):
    assert layout.hidden_size == HIDDEN and layout.intermediate_size == INTER
    for key, value in expected.items():
        assert getattr(layout, key) == value, key


@pytest.mark.parametrize("stripped", ["as_built", "no_config", "no_config_no_counts"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_read_the_same_whatever_the_release_keeps(family, stripped):
    block, cfg, expected = FAMILIES[family]()
    if stripped == "no_config":
        _strip(block, ("config",))
    elif stripped == "no_config_no_counts":  # counts from the tensors' shapes (LongCat's Z: router rows - N)
        _strip(block)
    _check(moe_layout(block, family), expected)
    _check(moe_layout(block, family, config=cfg), expected)  # an explicit config: config first


def test_longcat_counts_from_shapes_when_nothing_else_says():
    """Z is not a config or attribute value here: it is the router's rows minus down_proj's experts."""
    block, _, _ = _longcat()
    _strip(block)
    lay = moe_layout(block, "longcat_flash")
    assert (lay.num_ffn_experts, lay.num_zero_experts) == (5, 3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_contradictions_and_missing_parts_are_conversion_errors(family):
    block, cfg, _ = FAMILIES[family]()
    wrong = copy.deepcopy(cfg)
    wrong.hidden_size = HIDDEN + 8
    with pytest.raises(ConversionError, match="router weight"):
        moe_layout(block, family, config=wrong)  # config says 32, the tensors say 24: not silently trusted
    _strip(block)
    del block.experts.down_proj
    with pytest.raises(ConversionError):
        moe_layout(block, family)
    with pytest.raises(ConversionError, match="unknown family"):
        moe_layout(block, "nope")
    with pytest.raises(ConversionError, match="experts sub-modules"):
        moe_layout(torch.nn.Linear(2, 2), family)


@pytest.mark.parametrize("stripped", [False, True])
def test_longcat_from_hf_on_every_layout(stripped):
    """``ZeroComputeMoE.from_hf`` with or without the block's config (5.17 keeps it, 5.25 does not), outputs equal."""
    block, cfg, _ = _longcat()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.1)
        block.router.e_score_correction_bias.normal_(std=0.01)
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        ref = block(x)
    if stripped:
        _strip(block)
    ours = ZeroComputeMoE.from_hf(block)
    assert (ours.num_ffn_experts, ours.num_zero_experts, ours.top_k) == (5, 3, 3)
    assert ours.routed_scaling_factor == 2.5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="hf_moe"):
        ZeroComputeMoE.from_hf("not a module")


@pytest.mark.parametrize("zero_rows", [None, True, False])
def test_longcat_state_dict_back_to_hf_either_layout(zero_rows):
    block, _, _ = _longcat()
    ours = ZeroComputeMoE.from_hf(block)
    sd = mmkernels_to_hf(ours.state_dict(), num_zero_experts=3, zero_expert_rows=zero_rows)
    rows = sd["experts.gate_up_proj"].shape[0]
    if zero_rows is None:  # as the installed release allocates: loads into its block
        assert rows == block.experts.gate_up_proj.shape[0]
        block.load_state_dict(sd)
    else:
        assert rows == (8 if zero_rows else 5)
        assert not sd["experts.gate_up_proj"][5:].any()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_reads_stripped_blocks_and_matches_hf(family):
    """``patch`` on a block without the attributes other releases lack: patched (not skipped, no AttributeError),
    same outputs."""
    block, _, _ = FAMILIES[family]()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.2)
    x = torch.randn(3, 5, HIDDEN)
    with torch.no_grad():
        ref = block(x)  # HF's block forward needs what it built; ours does not
    _strip(block, modules=(block, block.experts))  # the router keeps what its own forward reads (probed at patch)
    report = PatchReport()
    assert patch_moe(block, report) == 1, str(report)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, atol=2e-5, rtol=1e-5)
    assert restore_all(block) >= 2
