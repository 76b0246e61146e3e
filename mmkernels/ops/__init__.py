"""Public functional ops. Each validates its inputs, picks a backend and calls a registered ``torch.ops.mmkernels``
op (or the PyTorch reference)."""

from .expert_bias import expert_bias_update_

__all__ = ["expert_bias_update_"]
