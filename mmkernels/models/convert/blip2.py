"""HF BLIP-2 (``Blip2Model`` / ``Blip2ForConditionalGeneration``, or its state dict with its ``Blip2Config``) -> the
vision tower, learned queries and Q-Former of :class:`mmkernels.models.VisionLanguageModel`. InstructBLIP
(``InstructBlipForConditionalGeneration`` / ``InstructBlipConfig``) converts the same way, its Q-Former with the text
path (word / position embeddings, text FFN) so that the model takes an instruction (``qformer_input_ids=``).

:func:`from_hf_blip2` reads the configs and converts the weights (through :mod:`.vit` and :mod:`.qformer`);
:func:`load_blip2` copies them into a built model. ``VisionLanguageModel.from_hf_blip2`` is these two calls around
the model's construction. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ..qformer_config import QFormerConfig
from ..scmoe import ScMoEConfig
from ..vlm_config import VLMConfig
from . import qformer as qconv
from . import vit as vconv
from ._common import ConversionError, check_value

__all__ = ["Blip2Parts", "ConversionError", "from_hf_blip2", "load_blip2"]

_OP = "VisionLanguageModel.from_hf_blip2"


class Blip2Parts(NamedTuple):
    """What :func:`from_hf_blip2` read: the model's config, the vision tower's and the Q-Former's converted state
    dicts, the learned queries ``[1, Nq, Dq]`` (their device and dtype are the model's) and the source's mode."""

    config: VLMConfig
    vision: dict[str, torch.Tensor]
    qformer: dict[str, torch.Tensor]
    query_tokens: torch.Tensor
    training: bool


def _is_blip2_config(config) -> bool:
    """A HF ``Blip2Config`` / ``InstructBlipConfig`` (duck-typed: transformers stays an optional import)."""
    return all(getattr(getattr(config, part, None), "hidden_size", None) is not None
               for part in ("vision_config", "qformer_config"))


def from_hf_blip2(model, *, decoder: ScMoEConfig | None = None, hf_config=None) -> Blip2Parts:
    """Read a HF BLIP-2 model (or its state dict with ``hf_config``); see
    :meth:`mmkernels.models.VisionLanguageModel.from_hf_blip2` for the arguments and the errors."""
    if decoder is not None and not isinstance(decoder, ScMoEConfig):
        raise TypeError(f"{_OP}: decoder must be a ScMoEConfig (or None for the tiny preset), got "
                        f"{type(decoder).__name__}")
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if not _is_blip2_config(config):
            raise TypeError(f"{_OP}: model must be a HF Blip2Model / Blip2ForConditionalGeneration (its config has "
                            f"vision_config and qformer_config), got {type(model).__name__} with config "
                            f"{type(config).__name__}")
        if hf_config is not None and hf_config is not config:
            raise ValueError(f"{_OP}: hf_config is only for a state dict (a model brings its own config)")
        hf_config, state_dict, training = config, model.state_dict(), model.training
    elif isinstance(model, Mapping):
        if hf_config is None:
            raise TypeError(f"{_OP}: a state dict needs hf_config= (its Blip2Config)")
        if not _is_blip2_config(hf_config):
            raise TypeError(f"{_OP}: hf_config must be a Blip2Config (with vision_config and qformer_config), got "
                            f"{type(hf_config).__name__}")
        state_dict, training = dict(model), False
    else:
        raise TypeError(f"{_OP}: model must be a HF BLIP-2 model or its state dict, got {type(model).__name__}")
    vision_cfg = vconv.vit_config_from_hf(hf_config.vision_config)
    # InstructBLIP's Q-Former text path (instruction tokens) when the weights hold its word embeddings
    q_cfg = QFormerConfig.from_hf(hf_config.qformer_config,
                                  text_input=f"qformer.{qconv.TEXT_EMBEDDING_KEY}" in state_dict)
    if "query_tokens" not in state_dict:
        raise ConversionError(f"{_OP}: no query_tokens in the state dict (not a BLIP-2 model?)")
    queries = state_dict["query_tokens"]
    # Every value we read is a floating-point tensor; the queries' shape comes from hf_config (not the tensor).
    check_value(_OP, "query_tokens", queries)
    nq = getattr(hf_config, "num_query_tokens", None)
    nq = nq if isinstance(nq, int) and not isinstance(nq, bool) else queries.shape[1]
    for key, value in state_dict.items():
        if key == "query_tokens" or key.startswith(("vision_model.", "qformer.")):
            check_value(_OP, key, value, (1, nq, q_cfg.hidden_size) if key == "query_tokens" else None)
    config = VLMConfig(vision=vision_cfg, qformer=q_cfg,
                       decoder=decoder if decoder is not None else ScMoEConfig.preset("tiny"), num_query_tokens=nq)
    vision_sd = vconv.hf_to_mmkernels({k: t for k, t in state_dict.items() if k.startswith("vision_model.")},
                                      num_layers=vision_cfg.num_layers, prefix="vision_model.")
    q_sd = qconv.hf_to_mmkernels({k: t for k, t in state_dict.items() if k.startswith("qformer.")}, q_cfg,
                                 prefix="qformer.")
    return Blip2Parts(config, vision_sd, q_sd, queries, bool(training))


def load_blip2(model: nn.Module, parts: Blip2Parts) -> nn.Module:
    """Copy ``parts`` into a :class:`VisionLanguageModel` built from ``parts.config`` (its ``vision``, ``qformer``
    and ``query_tokens``); its mode becomes the source's. A weight whose shape does not match is a
    :class:`ConversionError`."""
    for name, module, sd in (("vision_model.", model.vision, parts.vision), ("qformer.", model.qformer, parts.qformer)):
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:  # a size mismatch: a weight's shape does not match hf_config
            raise ConversionError(f"{_OP}: the {name}* weights do not match hf_config: {e}") from None
    with torch.no_grad():
        model.query_tokens.copy_(parts.query_tokens)
    return model.train(parts.training)
