"""Plain-PyTorch reference implementations: the CPU fallback, the tests' oracle and the benchmarks' baseline."""
