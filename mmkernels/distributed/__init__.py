"""mmkernels.distributed: expert parallelism on torch.distributed (docs/distributed.md).

- :class:`ExpertParallelMoE`: a :class:`mmkernels.nn.ZeroComputeMoE` whose FFN experts are sharded over a process
  group, with asynchronous dispatch / combine handles for overlapping the all-to-alls with dense work.
- :func:`all_to_all`: the differentiable variable-size all-to-all underneath.
"""

from .expert_parallel import CombineHandle, Dispatched, DispatchHandle, ExpertParallelMoE, all_to_all

__all__ = ["CombineHandle", "DispatchHandle", "Dispatched", "ExpertParallelMoE", "all_to_all"]
