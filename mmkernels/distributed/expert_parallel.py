"""``ExpertParallelMoE``: a :class:`mmkernels.nn.ZeroComputeMoE` whose FFN experts are sharded over the ranks of a
torch.distributed group (NCCL on GPUs, gloo on CPUs).

Data flow of one forward on rank r of W (E = N / W local experts, rank r owns global experts ``[r*E, (r+1)*E)``):

1. route locally (replicated fp32 router, selection bias, top-k): ``moe_route``;
2. ``moe_permute`` over all N FFN experts: this rank's dispatched rows come out grouped by global expert, hence by
   destination rank (experts are sharded contiguously); zero-expert slots and padding are not dispatched, so they
   never leave the rank;
3. one all-to-all of the per-(destination, local expert) row counts, then **the one device-to-host copy** of the
   split sizes (send and receive rows per rank), which ``all_to_all_single`` needs on the host;
4. the rows travel with a variable-size ``all_to_all_single`` (async: :meth:`ExpertParallelMoE.dispatch` returns a
   handle);
5. the local experts run on the received rows: the ``(source, expert)`` chunks are put expert-major by a chunk
   permutation computed from the ``[W, E]`` counts (:func:`chunk_permutation`; no sort), ``moe_grouped_swiglu``,
   and the inverse permutation back to the received order;
6. the results travel back with the inverse all-to-all (async: :meth:`ExpertParallelMoE.combine`), and
   ``moe_unpermute`` applies the routing weights and adds the zero-expert term on the token's own rank.

Both all-to-alls are differentiable (the backward of an all-to-all is the inverse all-to-all), so training works.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .._backends import BackendChoice, ModuleBackend, resolve_backends
from ..nn.moe import RoutedMoE, SwiGLUExperts, ZeroComputeMoE
from ..nn.moe_dispatch import MoEDispatcher, RoutedTokens, phase, register_expert_parallel
from ..ops import _validate as v
from ..ops.moe import MoEPermutation, MoERouting, moe_grouped_swiglu, moe_permute, moe_unpermute

__all__ = ["AllToAllDispatcher", "CombineHandle", "DispatchHandle", "Dispatched", "ExpertParallelMoE", "all_to_all",
           "chunk_permutation", "resolve_group"]

_NAME = "ExpertParallelMoE"
EP_OPS = ("moe_route", "moe_experts", "moe_permute", "moe_grouped_swiglu", "moe_unpermute", "expert_bias_update_")
_SPLIT_OPS = ("moe_permute", "moe_grouped_swiglu", "moe_unpermute")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INHERIT = object()


# ---- the differentiable, asynchronous all-to-all ------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows. Forward: issued asynchronously, the work handle goes into ``box`` (wait on
    it before reading the output). Backward: the inverse all-to-all of the gradient (split sizes swapped), blocking."""

    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group, box):
        ctx.splits = (list(in_splits), list(out_splits), group)
        send = rows.contiguous()
        out = rows.new_empty((sum(out_splits), rows.shape[1]))
        work = dist.all_to_all_single(out, send, list(out_splits), list(in_splits), group=group, async_op=True)
        box.extend((work, send))  # keep the send buffer alive until the work is waited on
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits, group = ctx.splits
        d_rows = grad.new_empty((sum(in_splits), grad.shape[1]))
        dist.all_to_all_single(d_rows, grad.contiguous(), in_splits, out_splits, group=group)
        return d_rows, None, None, None, None


def all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None,
               *, async_op: bool = False):
    """Differentiable variable-size all-to-all of rows: ``rows`` [sum(in_splits), C], ``in_splits[j]`` rows go to
    rank j; returns [sum(out_splits), C] with ``out_splits[j]`` rows from rank j (in rank order). The backward is
    the inverse all-to-all. ``async_op=True`` returns ``(out, work)``: call ``work.wait()`` before reading ``out``.

    Raises:
        ValueError: ``rows`` is not 2-D or does not have ``sum(in_splits)`` rows.
        TypeError: ``async_op`` is not a bool.
    """
    v.tensor("rows", rows, dim=2, op="all_to_all")
    async_op = v.flag("async_op", async_op, op="all_to_all")
    if rows.shape[0] != sum(in_splits):
        raise ValueError(f"all_to_all: rows has {rows.shape[0]} rows, in_splits sum to {sum(in_splits)}")
    box: list = []
    out = _AllToAll.apply(rows, list(out_splits), list(in_splits), group, box)
    if async_op:
        return out, box[0]
    box[0].wait()
    return out


def _splits(send: torch.Tensor, recv: torch.Tensor, e: int) -> torch.Tensor:
    """``[3, W]`` int64: rows this rank sends to each rank, rows it receives from each, each rank's input status."""
    return torch.stack([send[:, :e].sum(1), recv[:, :e].sum(1), recv[:, e]])


# ---- handles --------------------------------------------------------------------------------------------------------


class _Handle:
    """Communication in flight. ``wait()`` waits for it (on NCCL: orders the current CUDA stream after it; the host
    does not block) and returns the result; later calls return the same result. The wait is the profiler range
    ``span`` (``mmkernels.moe.dispatch_wait`` / ``mmkernels.moe.combine_wait``)."""

    _span = "mmkernels.moe.wait"

    def __init__(self, work, finish: Callable[[], object]) -> None:
        self._work = work
        self._finish = finish
        self._result = None
        self._done = False

    def is_completed(self) -> bool:
        """True when the communication has finished (always True after :meth:`wait`)."""
        return self._done or self._work is None or self._work.is_completed()

    def wait(self):
        if not self._done:
            with phase(self._span):
                if self._work is not None:
                    self._work.wait()
                self._result = self._finish()
            self._done = True
            self._work = self._finish = None
        return self._result


class DispatchHandle(_Handle):
    """Returned by :meth:`ExpertParallelMoE.dispatch`, with the count exchange in flight; ``wait() -> Dispatched``.

    Two steps, so that both can hide behind other work: :meth:`send` waits for the count exchange (the layer's one
    host synchronisation, for the split sizes) and issues the row all-to-all; :meth:`wait` sends if that has not
    happened yet, then waits for the rows. ``is_completed()`` sends on its own once the counts have arrived (a
    poll never blocks) and reports whether the rows have arrived. ``routed`` (the routing and router logits of this
    rank's tokens) is there at once.
    """

    _span = "mmkernels.moe.dispatch_wait"

    def __init__(self, send_rows: Callable[[], tuple], counts_ready: Callable[[], bool],
                 routed: RoutedTokens | None = None) -> None:
        super().__init__(None, lambda: None)
        self._send_rows, self._counts_ready = send_rows, counts_ready
        self._error: BaseException | None = None
        self.routed = routed

    def send(self) -> DispatchHandle:
        """Wait for the count exchange (blocks the host until the split sizes are known) and issue the row
        all-to-all. Idempotent; returns the handle.

        Raises:
            RuntimeError: another rank of the group rejected its input (see the error raised on that rank). Once
                raised, every later ``send`` / ``wait`` / ``is_completed`` on this handle raises it again.
        """
        if self._error is not None:
            raise self._error
        if self._send_rows is not None:
            send_rows, self._send_rows = self._send_rows, None
            try:
                self._work, self._finish = send_rows()
            except BaseException as err:
                self._error = err
                raise
        return self

    def is_completed(self) -> bool:
        if self._error is not None:
            raise self._error
        if self._send_rows is not None:
            if not self._counts_ready():
                return False
            self.send()
        return super().is_completed()

    def wait(self):
        self.send()
        return super().wait()


class CombineHandle(_Handle):
    """Returned by :meth:`ExpertParallelMoE.combine`; ``wait() -> y`` (the MoE output, the shape of the input)."""

    _span = "mmkernels.moe.combine_wait"


@dataclass
class Dispatched:
    """The rows this rank's experts must process, and what the combine needs to bring the results home.

    ``rows`` [M, Dm]: received token rows, grouped by source rank (rank order), then by local expert.
    ``local_expert_ids`` int64 [M]: the local expert (0..E-1) of each received row.
    ``routing``: this rank's tokens' :class:`MoERouting` (after the padding mask).
    ``router_logits``: fp32 [T, N+Z], this rank's router logits.
    """

    rows: torch.Tensor
    local_expert_ids: torch.Tensor
    routing: MoERouting
    router_logits: torch.Tensor
    send_splits: list[int] = field(repr=False)  # rows sent to each rank (host ints)
    recv_splits: list[int] = field(repr=False)  # rows received from each rank
    _permutation: MoEPermutation = field(repr=False, default=None)
    _hidden: torch.Tensor = field(repr=False, default=None)  # [T, Dm] (padding rows zeroed): the zero-expert term
    _shape: tuple = field(repr=False, default=())
    # The chunk permutation of the received rows (source-major -> expert-major) and the experts' row offsets.
    _by_expert: torch.Tensor = field(repr=False, default=None)
    _by_source: torch.Tensor = field(repr=False, default=None)
    _expert_offsets: torch.Tensor = field(repr=False, default=None)


class _Permute(torch.autograd.Function):
    """``rows[index]`` for a permutation ``index`` whose inverse is ``inverse``: the backward is the inverse gather
    (exact, deterministic, no scatter-add)."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def chunk_permutation(counts: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder received ``(source, expert)`` chunks expert-major, from the ``[W, E]`` row counts alone.

    Rows arrive source-major (chunk ``(w, e)`` holds ``counts[w, e]`` rows, in the order rank w sent them); the
    grouped GEMM wants them expert-major, each expert's rows in source order (Megatron's ``sort_chunks_by_idxs``).
    Returns ``by_expert`` (int64 [M]: ``grouped = rows[by_expert]``), its inverse ``by_source``
    (``received = grouped[by_source]``) and the experts' row ``offsets`` (int32 [E+1]). ``m`` = ``counts.sum()``, known
    on the host: no host sync. The same order as a stable sort of the rows by local expert, without the sort.
    """
    w, e = counts.shape
    flat = counts.reshape(-1)
    src_start = torch.cumsum(flat, 0) - flat  # chunk (w, e)'s first row, source-major
    em = counts.t().reshape(-1)
    dst_start = (torch.cumsum(em, 0) - em).view(e, w).t().reshape(-1)  # chunk (w, e)'s first row, expert-major
    chunk = torch.repeat_interleave(torch.arange(w * e, device=counts.device), flat, output_size=m)
    by_source = torch.arange(m, device=counts.device) - src_start[chunk] + dst_start[chunk]
    by_expert = torch.empty_like(by_source).scatter_(0, by_source, torch.arange(m, device=counts.device))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts.sum(0), 0)]).to(torch.int32)
    return by_expert, by_source, offsets


# ---- the all-to-all dispatcher ----------------------------------------------------------------------------------


class AllToAllDispatcher(MoEDispatcher):
    """Expert parallelism's dispatcher (the :mod:`mmkernels.nn.moe_dispatch` protocol): variable-size all-to-alls
    over ``group``, rank r owning global experts ``[r*E, (r+1)*E)``. ``ExpertParallelMoE`` holds one.

    - ``dispatch``: ``moe_permute`` over all N FFN experts (rows grouped by destination rank; zero-expert and padding
      slots stay behind), the ``[W, E]`` counts exchanged asynchronously; the handle's ``send`` takes the one host
      sync (the split sizes) and issues the rows;
    - ``run_experts``: the received ``(source, expert)`` chunks reordered expert-major by :func:`chunk_permutation`,
      ``moe_grouped_swiglu``, and back to the received order;
    - ``combine``: the inverse all-to-all; ``wait`` runs ``moe_unpermute`` (routing weights, zero-expert term).
    """

    def __init__(self, group, world_size: int, rank: int, num_local_experts: int) -> None:
        self.group, self.world_size, self.rank = group, world_size, rank
        self.num_local_experts = num_local_experts

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(rank={self.rank}/{self.world_size}, local_experts={self.num_local_experts})"

    def refuse(self, moe, error: Exception) -> None:
        self._send(moe, None, error=error)  # raises on every rank, after the count exchange

    def dispatch(self, moe, routed: RoutedTokens) -> DispatchHandle:
        return self._send(moe, routed)

    def _send(self, moe, routed: RoutedTokens | None, *, error: Exception | None = None) -> DispatchHandle:
        """Permute, issue the count exchange, and return the handle whose ``send`` issues the rows."""
        return self._exchange(moe, routed, self._plan(moe, routed, error=error), error=error)

    def _plan(self, moe, routed: RoutedTokens | None, *, error: Exception | None = None) -> tuple:
        """``moe_permute`` over all N FFN experts: (rows, permutation, [W, E] counts, [W, 1] input status)."""
        w, e = self.world_size, self.num_local_experts
        rows = perm = None
        with phase("mmkernels.moe.permute"):
            if error is None:
                # Rows grouped by global expert = grouped by destination rank; zero and padding slots stay behind.
                rows, perm = moe_permute(routed.hidden, routed.routing.topk_ids, num_local_experts=moe.num_ffn_experts,
                                         backend=moe._backends["moe_permute"])
                # Row counts per (destination rank, its local expert), from the plan itself (not from
                # routing.counts): the split sizes must match the rows exactly.
                counts = torch.diff(perm.offsets.to(torch.int64)).view(w, e)
                status = torch.zeros((w, 1), dtype=torch.int64, device=counts.device)
            else:
                counts = torch.zeros((w, e), dtype=torch.int64, device=moe.experts.w_gate_up.device)
                status = torch.ones((w, 1), dtype=torch.int64, device=counts.device)
        return rows, perm, counts, status

    def _exchange(self, moe, routed: RoutedTokens | None, plan: tuple, *, error: Exception | None = None
                  ) -> DispatchHandle:
        """Issue the count exchange of ``plan``; the handle's ``send`` takes the split sizes and issues the rows."""
        w, e = self.world_size, self.num_local_experts
        rows, perm, counts, status = plan
        with phase("mmkernels.moe.counts"):
            # Column E carries each rank's input status, so an input error on one rank stops every rank at the counts.
            send = torch.cat([counts, status], dim=1)
            recv = torch.empty_like(send)
            work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
            copied = None
            if send.device.type == "cuda":
                # NCCL: order the stream after the exchange and queue the copy of the split sizes into pinned memory
                # now; the host blocks on the event only in ``send`` (after the caller has queued its own work).
                work.wait()
                host = torch.empty((3, w), dtype=torch.int64, pin_memory=True)
                host.copy_(_splits(send, recv, e), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()

        def counts_ready() -> bool:
            return copied.query() if copied is not None else work.is_completed()

        def send_rows():
            with phase("mmkernels.moe.counts_wait"):
                if copied is not None:
                    copied.synchronize()  # the one host sync of the layer
                    splits = host
                else:
                    work.wait()  # gloo: blocks until the counts have arrived
                    splits = _splits(send, recv, e)
                send_splits, recv_splits, failed = splits.tolist()
            if any(failed):
                if error is not None:
                    raise error
                bad = [j for j, f in enumerate(failed) if f]
                raise RuntimeError(f"{_NAME}: rank(s) {bad} of the expert-parallel group rejected their input (see "
                                   "the error on those ranks); no rank sent anything")
            with phase("mmkernels.moe.dispatch_issue"):
                m = sum(recv_splits)
                hidden = routed.hidden
                got = recv[:, :e].to(hidden.device)
                # The chunk permutation of the rows to come (device-side, output sizes known: no sync).
                by_expert, by_source, offsets = chunk_permutation(got, m)
                local_ids = torch.repeat_interleave(torch.arange(e, device=hidden.device).repeat(w), got.reshape(-1),
                                                    output_size=m)
                box: list = []
                received = _AllToAll.apply(rows[: sum(send_splits)], recv_splits, send_splits, self.group, box)

            def finish() -> Dispatched:
                r = routed
                return Dispatched(received, local_ids, r.routing, r.router_logits, send_splits, recv_splits, perm,
                                  r.hidden, r.shape, by_expert, by_source, offsets)

            return box[0], finish

        handle = DispatchHandle(send_rows, counts_ready, routed)
        if error is not None:
            handle.send()  # raises on this rank (every other rank raises when it sends)
        return handle

    def run_experts(self, moe, dispatched: Dispatched) -> torch.Tensor:
        """This rank's experts on the received rows: [M, Dm] in the order of ``dispatched.rows`` (no weights yet).
        The rows are put expert-major by the chunk permutation (no sort, no weighted combine) and back after."""
        d = dispatched
        grouped = _Permute.apply(d.rows, d._by_expert, d._by_source)
        out = moe_grouped_swiglu(grouped, d._expert_offsets, moe.experts.w_gate_up, moe.experts.w_down,
                                 backend=moe._backends["moe_grouped_swiglu"])
        return _Permute.apply(out, d._by_source, d._by_expert)

    def combine(self, moe, expert_out: torch.Tensor, dispatched: Dispatched) -> CombineHandle:
        d = dispatched
        if not isinstance(d, Dispatched):
            raise TypeError(f"{_NAME}: combine takes the Dispatched that dispatch(...).wait() returns, got "
                            f"{type(d).__name__}" + (" (call .wait() on it first)" if isinstance(d, DispatchHandle)
                                                     else ""))
        if tuple(expert_out.shape) != tuple(d.rows.shape):
            raise ValueError(f"{_NAME}: expert_out must be [M, Dm] = {tuple(d.rows.shape)}, got "
                             f"{tuple(expert_out.shape)}")
        with phase("mmkernels.moe.combine_issue"):
            box: list = []
            back = _AllToAll.apply(expert_out, d.send_splits, d.recv_splits, self.group, box)

        def finish() -> torch.Tensor:
            with phase("mmkernels.moe.unpermute"):
                r = d.routing
                y = moe_unpermute(back, d._permutation, r.topk_weights, zero_weight=r.zero_weight, hidden=d._hidden,
                                  backend=moe._backends["moe_unpermute"])
                return y.view(d._shape)

        return CombineHandle(box[0], finish)


# ---- the module -----------------------------------------------------------------------------------------------------


def resolve_group(group, *, owner: str = _NAME):
    """A ProcessGroup from ``group``: a ProcessGroup, a 1-D DeviceMesh, or None (the default group)."""
    if not dist.is_available():
        raise RuntimeError(f"{owner}: torch.distributed is not available in this build of PyTorch")
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError(f"{owner}: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group (torchrun sets its environment) or pass a group")
        return dist.group.WORLD
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{owner}: a DeviceMesh group must be 1-D (the expert-parallel dimension), got "
                             f"{group.ndim}-D; pass mesh[dim_name]")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"{owner}: group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a small control tensor must live for ``group``'s backend: CUDA for NCCL, CPU for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and (device.type == "cuda" or "gloo" not in backend):
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _ExpertParallelBackend(ModuleBackend):
    """The fan-out ``ModuleBackend`` of :class:`ExpertParallelMoE`, plus one alias: ``moe_experts`` (what a
    ``ZeroComputeMoE`` choice names) stands for the three split pieces ``moe_permute`` / ``moe_grouped_swiglu`` /
    ``moe_unpermute`` wherever a mapping leaves them unset (None)."""

    def __set__(self, obj, value: BackendChoice) -> None:
        super().__set__(obj, value)
        if isinstance(value, Mapping) and value.get("moe_experts") is not None:
            m = dict(value)
            for op in _SPLIT_OPS:
                if m.get(op) is None:
                    m[op] = value["moe_experts"]
            obj.__dict__["_backends"] = resolve_backends(self.owner, m, self.ops)


class ExpertParallelMoE(RoutedMoE):
    """A :class:`ZeroComputeMoE` with its N FFN experts sharded over the W ranks of a process group.

    Build it with :meth:`from_moe` (every rank, with the same configuration). Rank r (its rank in the group) keeps
    global experts ``[r*N/W, (r+1)*N/W)`` in ``.experts`` (a :class:`SwiGLUExperts` of ``N/W`` experts); ``.router``
    (fp32), the zero experts and ``.balancer`` (an :class:`ExpertBiasController`) are replicated.

    ``forward(x [..., Dm], *, padding_mask=None, return_router_logits=False)`` is ``ZeroComputeMoE``'s: the same
    output for this rank's tokens (each rank passes its own tokens; all ranks must call it together, also when a
    rank has no tokens). Gradients: ``x`` and the local experts get exactly their gradients; the router and the
    replicated balancer are data-parallel (each rank's router gradient covers its own tokens: all-reduce them
    like any replicated parameter, e.g. with DDP). All ranks must agree on whether ``x`` requires grad.

    The step is :class:`mmkernels.nn.moe.RoutedMoE`'s, through an :class:`AllToAllDispatcher` (``.dispatcher``),
    split for overlap (see :class:`mmkernels.models.ScMoEDecoderLayer`): ``h = moe.dispatch(x)`` (count exchange in
    flight), ``h.send()`` (rows in flight), ``d = h.wait()``, ``out = moe.run_experts(d)``,
    ``y = moe.combine(out, d).wait()``.

    **One host synchronisation per forward**: ``all_to_all_single`` takes its split sizes as host integers, so a
    ``[3, W]`` int64 tensor (rows to send, rows to receive, input status per rank) comes to the host once, after
    the count all-to-all (the counts come from the permutation plan, so routing and permutation are queued before
    it). :meth:`dispatch` issues the count exchange and returns; on CUDA it also queues the copy (non-blocking, into
    pinned memory) behind the exchange. The host blocks only in ``handle.send()``, so work queued between
    ``dispatch`` and ``send`` hides the exchange. The backward reuses the host split sizes: no further sync.

    Balancing: in training mode every forward adds its (local) selection counts to ``pending_counts``; call
    :meth:`update_bias` once per optimizer step on every rank: the counts are all-reduced over
    ``balancer.process_group`` (the expert-parallel group by default; set it to the group of all ranks sharing this
    layer's bias when data parallelism spans more ranks).

    State dict: ``state_dict()`` gathers the full ``[N, ...]`` expert weights (a collective: call it on every rank,
    save on one), with the keys of ``ZeroComputeMoE``, so ``ZeroComputeMoE.load_state_dict`` (and the HF
    converters) read it. With ``full_state_dict = False`` (no communication) each expert weight is a ``DTensor``
    sharded on dim 0 over the group's 1-D mesh, so ``torch.distributed.checkpoint`` saves every rank's experts under
    their global indices and loads them exactly into any world size (resharding), or into a ``ZeroComputeMoE``.
    ``load_state_dict`` takes a full state dict (each rank slices its shard) or a sharded one of the same layout;
    a shard saved by another rank or world size (e.g. ``torch.load`` of the wrong rank's file) raises ``ValueError``.

    ``backend``: as ``ZeroComputeMoE``'s, over ``moe_route``, ``moe_experts``, ``moe_permute``,
    ``moe_grouped_swiglu``, ``moe_unpermute``, ``expert_bias_update_``; ``moe_experts`` also stands for the three
    split pieces where a mapping leaves them unset.
    """

    _name = _NAME
    backend = _ExpertParallelBackend(*EP_OPS)

    def __init__(self, moe: ZeroComputeMoE, group=None, *, backend: BackendChoice = _INHERIT) -> None:
        super().__init__()
        if not isinstance(moe, ZeroComputeMoE):
            raise TypeError(f"{_NAME}: from_moe takes a mmkernels.nn.ZeroComputeMoE, got {type(moe).__name__}")
        pg = resolve_group(group)
        self.group = pg
        self.world_size = dist.get_world_size(pg)
        self.rank = dist.get_rank(pg)
        self.hidden_size = moe.hidden_size
        self.num_ffn_experts = moe.num_ffn_experts
        self.num_zero_experts = moe.num_zero_experts
        self.top_k = moe.top_k
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.scoring = moe.scoring
        self.renormalize = moe.renormalize
        self.balance = moe.balance
        w_gu, w_down = moe.experts.w_gate_up, moe.experts.w_down
        self.expert_intermediate_size = moe.experts.intermediate_size
        dtype, device = w_gu.dtype, w_gu.device
        self._check_same_config(device, dtype)  # collective: before any check that could fail on one rank only
        n, w = self.num_ffn_experts, self.world_size
        if n % w:
            raise ValueError(f"{_NAME}: the {n} FFN experts cannot be split evenly over {w} ranks (N % W = {n % w}); "
                             "use a world size that divides N")
        self.num_local_experts = n // w
        self.expert_offset = self.rank * self.num_local_experts
        self.router = copy.deepcopy(moe.router)
        balancer_group = moe.balancer.process_group
        memo = {} if balancer_group is None else {id(balancer_group): balancer_group}
        self.balancer = copy.deepcopy(moe.balancer, memo)
        if balancer_group is None:
            self.balancer.process_group = pg
        e, lo = self.num_local_experts, self.expert_offset
        self.experts = SwiGLUExperts(e, self.hidden_size, self.expert_intermediate_size, device=device, dtype=dtype)
        with torch.no_grad():
            self.experts.w_gate_up.copy_(w_gu[lo: lo + e])
            self.experts.w_down.copy_(w_down[lo: lo + e])
        self.register_buffer("pending_counts", torch.zeros_like(moe.pending_counts), persistent=False)
        self.dispatcher = AllToAllDispatcher(pg, self.world_size, self.rank, self.num_local_experts)
        self.full_state_dict = True
        self._meshes: dict = {}  # device type -> the group's 1-D DeviceMesh (sharded state dicts)
        # last: checks the choice and hands the experts and the balancer their share
        self.backend = moe.backend if backend is _INHERIT else backend
        self.register_state_dict_post_hook(_gather_experts_hook)
        self.register_load_state_dict_pre_hook(_shard_experts_hook)

    @classmethod
    def from_moe(cls, moe: ZeroComputeMoE, group=None, *, backend: BackendChoice = _INHERIT) -> ExpertParallelMoE:
        """Shard ``moe`` over ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None for the default group).

        Call on every rank of the group with the same configuration. Router, selection bias and balancer state are
        copied; this rank's slice of the expert weights is copied (``moe`` may be freed afterwards, and may live on
        the meta device: then ``to_empty`` and load a full state dict). ``backend`` defaults to ``moe``'s choice
        (its ``moe_experts`` entry is used for ``moe_permute`` / ``moe_grouped_swiglu`` / ``moe_unpermute``).

        Raises:
            RuntimeError: torch.distributed is not initialised and no group is given.
            TypeError: ``moe`` is not a ``ZeroComputeMoE``, or ``group`` is of the wrong type.
            ValueError (on every rank): the ranks' hidden size, N, Z, K, expert intermediate size, dtype, scoring,
                renormalisation or scaling factor differ; or N is not divisible by the world size.
        """
        return cls(moe, group, backend=backend)

    # -- configuration ------------------------------------------------------------------------------------------------

    def _check_same_config(self, device: torch.device, dtype: torch.dtype) -> None:
        """All-gather a small description of this rank's configuration; raise on every rank if any differs."""
        fields = {
            "hidden_size": self.hidden_size,
            "num_ffn_experts": self.num_ffn_experts,
            "num_zero_experts": self.num_zero_experts,
            "top_k": self.top_k,
            "expert_intermediate_size": self.expert_intermediate_size,
            "dtype": _DTYPES.index(dtype) if dtype in _DTYPES else -1,
            "scoring": ("softmax", "sigmoid").index(self.scoring),
            "renormalize": int(self.renormalize),
            "routed_scaling_factor": int(torch.tensor(float(self.routed_scaling_factor),
                                                      dtype=torch.float64).view(torch.int64)),
        }
        mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=_comm_device(self.group, device))
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        table = torch.stack(everyone).cpu()
        bad = [(name, table[:, i].tolist()) for i, name in enumerate(fields) if (table[:, i] != table[0, i]).any()]
        if bad:
            def show(name, values):
                if name == "dtype":
                    values = [str(_DTYPES[x]).replace("torch.", "") if x >= 0 else "other" for x in values]
                elif name == "routed_scaling_factor":
                    values = [torch.tensor(x, dtype=torch.int64).view(torch.float64).item() for x in values]
                return f"{name} " + ", ".join(f"rank{r}={x}" for r, x in enumerate(values))

            raise ValueError(f"{_NAME}: the ranks of the expert-parallel group were built with different "
                             f"configurations: {'; '.join(show(n, vals) for n, vals in bad)}")

    def extra_repr(self) -> str:
        lo, e = self.expert_offset, self.num_local_experts
        return (f"hidden={self.hidden_size}, num_ffn_experts={self.num_ffn_experts}, "
                f"num_zero_experts={self.num_zero_experts}, top_k={self.top_k}, rank={self.rank}/{self.world_size}, "
                f"local_experts=[{lo}, {lo + e})")

    # -- the step: RoutedMoE's dispatch / run_experts / combine / forward through the all-to-all dispatcher ----------

    def _check_input(self, x: torch.Tensor) -> None:
        v.tensor("x", x, op=_NAME)
        w_gu = self.experts.w_gate_up
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{_NAME}: x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != w_gu.dtype:
            raise TypeError(f"{_NAME}: x must have the experts' dtype {w_gu.dtype}, got {x.dtype}")
        v.same_device(_NAME, x=x, experts=w_gu)

    def __deepcopy__(self, memo):
        # A ProcessGroup cannot be copied: the copy shares it (it is the same communicator).
        memo[id(self.group)] = self.group
        memo[id(self._meshes)] = self._meshes  # DeviceMeshes of the same group: shared too
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new


# ---- state-dict hooks ---------------------------------------------------------------------------------------------

_EXPERT_KEYS = ("experts.w_gate_up", "experts.w_down")
_SHARD_META = "expert_shard"  # per-module state-dict metadata of a sharded save: [offset, num_local, num_experts]


def _expert_mesh(module: ExpertParallelMoE, device: torch.device):
    """The 1-D DeviceMesh of ``module.group`` on ``device``'s type (CPU for the meta device)."""
    from torch.distributed.device_mesh import DeviceMesh

    device_type = device.type if device.type != "meta" else "cpu"
    mesh = module._meshes.get(device_type)
    if mesh is None:
        mesh = module._meshes[device_type] = DeviceMesh.from_group(module.group, device_type=device_type)
    return mesh


def _gather_experts_hook(module: ExpertParallelMoE, state_dict, prefix, local_metadata) -> None:
    """Full mode: all-gather the shards into ``[N, ...]`` tensors (ZeroComputeMoE's keys and shapes). Sharded mode
    (``full_state_dict = False``): each shard becomes a DTensor sharded on dim 0 over the group's 1-D mesh (its
    global identity: ``torch.distributed.checkpoint`` saves and reshards it), and the module's metadata records
    ``[offset, num_local, N]`` so that a plain ``torch.load`` of a rank's file is checked on load."""
    if module.full_state_dict:
        if module.world_size == 1:
            return
        for key in _EXPERT_KEYS:
            name = prefix + key
            if name not in state_dict:
                continue
            local = state_dict[name].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(module.world_size)]
            dist.all_gather(parts, local, group=module.group)
            state_dict[name] = torch.cat(parts)
        return
    from torch.distributed.tensor import DTensor, Shard

    local_metadata[_SHARD_META] = [module.expert_offset, module.num_local_experts, module.num_ffn_experts]
    for key in _EXPERT_KEYS:
        name = prefix + key
        value = state_dict.get(name)
        if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
            continue
        local = value.detach()  # shares the parameter's storage: DCP loads in place
        shape = torch.Size((module.num_ffn_experts, *local.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        state_dict[name] = DTensor.from_local(local, _expert_mesh(module, local.device), [Shard(0)], run_check=False,
                                              shape=shape, stride=stride)


def _shard_experts_hook(module: ExpertParallelMoE, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Take this rank's experts out of a full state dict; check a sharded one's identity (its DTensor layout and the
    saved ``[offset, num_local, N]``) before anything is copied: a shard saved by another rank or another world
    size is a ``ValueError``, never a silent load of the wrong experts."""
    n, e, lo = module.num_ffn_experts, module.num_local_experts, module.expert_offset
    saved = local_metadata.get(_SHARD_META)
    shards = {}
    for key in _EXPERT_KEYS:
        name = prefix + key
        value = state_dict.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            continue  # torch reports missing keys and wrong shapes
        where = f"{_NAME}.load_state_dict: state_dict[{name!r}]"
        hint = ("save with full_state_dict = True (a full [N, ...] tensor, any world size) or reshard with "
                "torch.distributed.checkpoint")
        if _is_dtensor(value):
            if value.shape[0] != n:
                raise ValueError(f"{where} holds {value.shape[0]} experts, this block has N = {n}")
            if not _same_layout(module, value):
                raise ValueError(f"{where} is a DTensor of another layout ({value.placements} over a mesh of "
                                 f"{value.device_mesh.size()} ranks; this block: Shard(0) over its {module.world_size}"
                                 f"-rank group); {hint}")
            local = value.to_local()
        elif value.shape[0] == n and saved is None:
            local = value[lo: lo + e]  # a full state dict: this rank's slice
        else:
            local = value  # a plain shard: only with the identity saved next to it
            if saved is None:
                raise ValueError(f"{where} has {value.shape[0]} experts: neither the full N = {n} nor a shard that "
                                 f"records which experts it holds (saved by this version with full_state_dict = "
                                 f"False); {hint}")
        if saved is not None and list(saved) != [lo, e, n]:
            s_lo, s_e, s_n = saved
            s_rank, s_world = s_lo // max(s_e, 1), s_n // max(s_e, 1)
            raise ValueError(f"{where} holds experts [{s_lo}, {s_lo + s_e}) of {s_n} (saved by rank {s_rank} of "
                             f"{s_world}); this is rank {module.rank} of {module.world_size}, which owns "
                             f"[{lo}, {lo + e}) of {n}: load each rank's file on that rank of the same world size, "
                             f"or {hint}")
        shards[name] = local
    state_dict.update(shards)  # only once every check has passed: a refused load changes nothing
    with torch.no_grad():  # counts gathered before a load belong to no step of the loaded model (or are garbage
        module.pending_counts.zero_()  # after to_empty)


def _is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(value, DTensor)


def _same_layout(module: ExpertParallelMoE, value) -> bool:
    """``value`` (a DTensor) is sharded on dim 0, evenly, over the ranks of ``module.group`` in the same order."""
    from torch.distributed.tensor import Shard

    mesh = value.device_mesh
    if mesh.ndim != 1 or tuple(value.placements) != (Shard(0),) or mesh.size() != module.world_size:
        return False
    return mesh.mesh.flatten().tolist() == dist.get_process_group_ranks(module.group)


def _shard(moe: ZeroComputeMoE, group, *, backend: BackendChoice = None) -> ExpertParallelMoE:
    return ExpertParallelMoE.from_moe(moe, group, backend=backend)


# Plug expert parallelism into the MoE step protocol: model code asks mmkernels.nn.moe_dispatch for it by group.
register_expert_parallel(resolve_group=resolve_group, shard=_shard)
