"""Triton kernels, one file per op family. Import these modules only when triton is installed."""
