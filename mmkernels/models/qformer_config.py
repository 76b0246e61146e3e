"""``QFormerConfig`` and the Q-Former presets: the shapes of a :class:`mmkernels.models.QFormer`. A module of its own so
that the model (:mod:`mmkernels.models.qformer`) and its converter (:mod:`mmkernels.models.convert.qformer`) both
import it and neither imports the other back; ``mmkernels.models.qformer`` re-exports these names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F

from ..ops import _validate as check

__all__ = ["ACTIVATIONS", "NUM_QUERY_TOKENS", "PRESETS", "QFormerConfig"]

_NAME = "QFormer"
_CONFIG = "QFormerConfig"
NUM_QUERY_TOKENS = 32  # BLIP-2 and InstructBLIP learn 32 query tokens

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class QFormerConfig:
    """Hyper-parameters, named after HF ``Blip2QFormerConfig`` fields where they exist. Defaults: BLIP-2."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408  # EVA ViT-g/14 features
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1  # as HF (active in train mode only)
    attention_probs_dropout_prob: float = 0.1  # as HF: on the self- and cross-attention probabilities, train mode
    # InstructBLIP's text path (instruction tokens beside the queries). ``vocab_size=None``: none (BLIP-2's Q-Former:
    # query tokens only, no word / position embeddings, no text FFN).
    vocab_size: int | None = None
    max_position_embeddings: int = 512
    pad_token_id: int | None = 0  # the word embedding's padding_idx (its row gets no gradient), as HF

    def __post_init__(self) -> None:
        for field in ("hidden_size", "num_attention_heads", "intermediate_size", "encoder_hidden_size",
                      "cross_attention_frequency"):
            check.integer(field, getattr(self, field), op=_CONFIG, low=1)
        check.integer("num_hidden_layers", self.num_hidden_layers, op=_CONFIG, low=0)
        if self.vocab_size is not None:
            check.integer("vocab_size", self.vocab_size, op=_CONFIG, low=1)
        check.integer("max_position_embeddings", self.max_position_embeddings, op=_CONFIG, low=1)
        if self.pad_token_id is not None:
            check.integer("pad_token_id", self.pad_token_id, op=_CONFIG, low=0,
                          high=None if self.vocab_size is None else self.vocab_size - 1)
        check.real("layer_norm_eps", self.layer_norm_eps, op=_CONFIG, low=0.0)
        check.real("hidden_dropout_prob", self.hidden_dropout_prob, op=_CONFIG, low=0.0, high=1.0)
        check.real("attention_probs_dropout_prob", self.attention_probs_dropout_prob, op=_CONFIG, low=0.0)
        if self.attention_probs_dropout_prob >= 1.0:
            raise ValueError(f"{_CONFIG}: attention_probs_dropout_prob must be in [0, 1), got "
                             f"{self.attention_probs_dropout_prob}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{_NAME}: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"{_NAME}: cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{_NAME}: hidden_act {self.hidden_act!r} not supported; one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> QFormerConfig:
        """``"blip2"`` or ``"instructblip"``."""
        if name not in PRESETS:
            raise ValueError(f"{_CONFIG}: unknown preset {name!r}; one of {sorted(PRESETS)}")
        return PRESETS[name]

    def replace(self, **changes) -> QFormerConfig:
        return dataclasses.replace(self, **changes)

    @property
    def has_text_input(self) -> bool:
        """Whether the model takes instruction tokens (InstructBLIP): ``vocab_size`` is set."""
        return self.vocab_size is not None

    @property
    def cross_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i % self.cross_attention_frequency == 0]

    @classmethod
    def from_hf(cls, hf_config, *, text_input: bool | None = None) -> QFormerConfig:
        """From a HF ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig`` (or a ``Blip2Config`` /
        ``InstructBlipConfig``: its ``qformer_config`` is used).

        ``text_input``: whether to build InstructBLIP's text path (``vocab_size``, ``max_position_embeddings`` and
        ``pad_token_id`` read from the config). ``None`` (default): yes for an InstructBLIP(-Video) Q-Former config
        (``model_type`` ``instructblip*``, whose HF model always holds word / position embeddings), no otherwise
        (BLIP-2's ``Blip2QFormerModel`` has none). The converters pass what the weights hold."""
        hf_config = getattr(hf_config, "qformer_config", hf_config)
        if text_input is None:
            text_input = str(getattr(hf_config, "model_type", "")).startswith("instructblip")
        elif not isinstance(text_input, bool):
            raise TypeError(f"{_CONFIG}.from_hf: text_input must be a bool or None, got {type(text_input).__name__}")
        text = {}
        if text_input:
            text = dict(vocab_size=hf_config.vocab_size, max_position_embeddings=hf_config.max_position_embeddings,
                        pad_token_id=getattr(hf_config, "pad_token_id", None))
        act = hf_config.hidden_act
        if not isinstance(act, str):
            raise ValueError(f"{_NAME}: hidden_act must be a string, got {act!r}")
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{_NAME}: only absolute position embeddings (none for query tokens) are supported")
        return cls(
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            encoder_hidden_size=hf_config.encoder_hidden_size,
            cross_attention_frequency=hf_config.cross_attention_frequency,
            layer_norm_eps=hf_config.layer_norm_eps,
            hidden_act=act,
            hidden_dropout_prob=hf_config.hidden_dropout_prob,
            attention_probs_dropout_prob=float(getattr(hf_config, "attention_probs_dropout_prob", 0.0) or 0.0),
            **text,
        )


# BLIP-2 (OPT-2.7b/6.7b, FlanT5-XL/XXL: one Q-Former config) and InstructBLIP (the same Q-Former shapes plus the
# text path of HF's InstructBlipQFormerConfig defaults: 30522 words, 512 positions; the released checkpoints have
# 30523 words, which from_hf reads; see docs/models/qformer.md).
PRESETS: dict[str, QFormerConfig] = {
    "blip2": QFormerConfig(),
    "instructblip": QFormerConfig(vocab_size=30522, max_position_embeddings=512, pad_token_id=0),
}
