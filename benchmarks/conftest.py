"""pytest-benchmark suite: the CPU-runnable rows of every mmkernels-bench suite (quick shapes).

    pytest benchmarks/ --benchmark-json bench.json

GPU rows are timed by `benchmarks/gpu_suite.sh` (mmkernels-bench with CUDA events), not here.
"""
