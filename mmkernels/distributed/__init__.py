"""mmkernels.distributed: expert parallelism on torch.distributed (docs/distributed.md).

- :class:`ExpertParallelMoE`: a :class:`mmkernels.nn.ZeroComputeMoE` whose FFN experts are sharded over a process
  group, run through :class:`AllToAllDispatcher` (the all-to-all side of the MoE step protocol of
  :mod:`mmkernels.nn.moe_dispatch`), with asynchronous dispatch / combine handles for overlapping the all-to-alls
  with dense work.
- :func:`all_to_all`: the differentiable variable-size all-to-all underneath.

Importing this package (``import mmkernels`` does) registers the expert-parallel factory with
:mod:`mmkernels.nn.moe_dispatch`, which is how ``ScMoEDecoderLayer(ep_group=...)`` shards its MoE without
``mmkernels.models`` importing this package.
"""

from .expert_parallel import (
    AllToAllDispatcher,
    CombineHandle,
    Dispatched,
    DispatchHandle,
    ExpertParallelMoE,
    all_to_all,
    chunk_permutation,
)

__all__ = ["AllToAllDispatcher", "CombineHandle", "DispatchHandle", "Dispatched", "ExpertParallelMoE", "all_to_all",
           "chunk_permutation"]
