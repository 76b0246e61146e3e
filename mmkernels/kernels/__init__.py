"""Kernels: Triton (``kernels.triton``) and plain-PyTorch references (``kernels.reference``)."""
