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
5. the local experts run on the received rows (``moe_permute`` by local expert, ``moe_grouped_swiglu``,
   ``moe_unpermute`` back to the received order);
6. the results travel back with the inverse all-to-all (async: :meth:`ExpertParallelMoE.combine`), and
   ``moe_unpermute`` applies the routing weights and adds the zero-expert term on the token's own rank.

Both all-to-alls are differentiable (the backward of an all-to-all is the inverse all-to-all), so training works.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .._backends import BackendChoice, resolve_backends
from ..nn.moe import RoutedMoE, SwiGLUExperts, ZeroComputeMoE, mask_padding
from ..ops import _validate as v
from ..ops.moe import MoEPermutation, MoERouting, moe_grouped_swiglu, moe_permute, moe_unpermute

__all__ = ["CombineHandle", "DispatchHandle", "Dispatched", "ExpertParallelMoE", "all_to_all"]

_NAME = "ExpertParallelMoE"
EP_OPS = ("moe_route", "moe_permute", "moe_grouped_swiglu", "moe_unpermute", "expert_bias_update_")
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
    """
    v.tensor("rows", rows, dim=2, op="all_to_all")
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
    does not block) and returns the result; later calls return the same result."""

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
    poll never blocks) and reports whether the rows have arrived.
    """

    def __init__(self, send_rows: Callable[[], tuple], counts_ready: Callable[[], bool]) -> None:
        super().__init__(None, lambda: None)
        self._send_rows, self._counts_ready = send_rows, counts_ready
        self._error: BaseException | None = None

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


def _translate_backend(choice: BackendChoice) -> BackendChoice:
    """A ZeroComputeMoE backend choice for the EP ops: ``moe_experts`` stands for the three split pieces."""
    if choice is None or isinstance(choice, str):
        return choice
    m = dict(choice)
    experts = m.pop("moe_experts", None)
    if experts is not None:
        for op in _SPLIT_OPS:
            m.setdefault(op, experts)
    return m


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

    The step is split for overlap (see :class:`mmkernels.models.ScMoEDecoderLayer`):
    ``h = moe.dispatch(x)`` (count exchange in flight), ``h.send()`` (rows in flight), ``d = h.wait()``,
    ``out = moe.run_experts(d)``, ``y = moe.combine(out, d).wait()``.

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
    """

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
        self.backend = moe.backend if backend is _INHERIT else backend
        self.full_state_dict = True
        self._meshes: dict = {}  # device type -> the group's 1-D DeviceMesh (sharded state dicts)
        # Optional callable(name) called at phase boundaries ("route", "permute", "counts", "dispatch_issue",
        # "dispatch_done", "experts", "combine_issue", "combine_done", "unpermute_done"): the benchmark's timeline.
        self.phase_hook: Callable[[str], None] | None = None
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

    @property
    def backend(self) -> BackendChoice:
        """The backend choice (``None``, a name, or ``{op: name}`` over ``moe_route``, ``moe_permute``,
        ``moe_grouped_swiglu``, ``moe_unpermute``, ``expert_bias_update_``; ``moe_experts`` stands for the three
        split pieces)."""
        return self._backend_choice

    @backend.setter
    def backend(self, value: BackendChoice) -> None:
        self._backends = resolve_backends(_NAME, _translate_backend(value), EP_OPS)
        self._backend_choice = value
        if "balancer" in self._modules:  # not yet while __init__ runs
            self.balancer.backend = self._backends["expert_bias_update_"]

    def extra_repr(self) -> str:
        lo, e = self.expert_offset, self.num_local_experts
        return (f"hidden={self.hidden_size}, num_ffn_experts={self.num_ffn_experts}, "
                f"num_zero_experts={self.num_zero_experts}, top_k={self.top_k}, rank={self.rank}/{self.world_size}, "
                f"local_experts=[{lo}, {lo + e})")

    # -- the step (route / expert_bias come from RoutedMoE: this rank's tokens, the replicated bias) --------------

    def dispatch(self, x: torch.Tensor, *, padding_mask: torch.Tensor | None = None) -> DispatchHandle:
        """Route this rank's tokens and send each dispatched slot's row to the rank owning its expert.

        ``x`` [..., Dm] in the experts' dtype; ``padding_mask`` bool of ``x.shape[:-1]`` (True = padding: not routed,
        not counted, zero output). Returns with the count exchange in flight (the host does not block here):
        ``handle.send()`` waits for the split sizes (the layer's one host sync, see the class notes) and issues the
        row all-to-all; ``handle.wait()`` sends if needed and returns a :class:`Dispatched`.

        Raises:
            TypeError / ValueError: ``x`` or ``padding_mask`` of the wrong type, dtype, shape or device (on this rank;
                raised here, after this rank's part of the count exchange).
            RuntimeError: from ``handle.send()`` / ``handle.wait()``: another rank's input failed those checks.
                Input errors travel with the count exchange, so every rank raises instead of waiting in a collective
                for the failed one.
        """
        try:
            hidden, routing, logits = self._route_tokens(x, padding_mask)
        except (TypeError, ValueError) as err:
            self._send(None, None, None, (), error=err)  # raises on every rank, after the count exchange
            raise  # not reached: _send raises
        return self._send(hidden, routing, logits, tuple(x.shape))

    def _mark(self, name: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(name)

    def _route_tokens(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        v.tensor("x", x, op=_NAME)
        w_gu = self.experts.w_gate_up
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{_NAME}: x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != w_gu.dtype:
            raise TypeError(f"{_NAME}: x must have the experts' dtype {w_gu.dtype}, got {x.dtype}")
        v.same_device(_NAME, x=x, experts=w_gu)
        self._mark("route")
        hidden, pad = self._tokens(_NAME, x, padding_mask)
        logits = self.router(hidden)
        routing = self._route(logits)
        if pad is not None:
            routing = mask_padding(routing, pad)
        if self.training and self.balance:  # counted once per forward, not again in a checkpoint recompute
            torch.ops.mmkernels.accumulate_counts_(self.pending_counts, routing.counts)
        return hidden, routing, logits

    def _send(self, hidden: torch.Tensor | None, routing: MoERouting | None, logits: torch.Tensor | None,
              shape: tuple, *, error: Exception | None = None) -> DispatchHandle:
        """Permute, issue the count exchange, and return the handle whose ``send`` issues the rows."""
        w, e = self.world_size, self.num_local_experts
        self._mark("permute")
        if error is None:
            # Rows grouped by global expert = grouped by destination rank; zero and padding slots stay behind.
            rows, perm = moe_permute(hidden, routing.topk_ids, num_local_experts=self.num_ffn_experts,
                                     backend=self._backends["moe_permute"])
            # Row counts per (destination rank, its local expert), from the plan itself (not from routing.counts):
            # the split sizes must match the rows exactly.
            counts = torch.diff(perm.offsets.to(torch.int64)).view(w, e)
            status = torch.zeros((w, 1), dtype=torch.int64, device=counts.device)
        else:
            counts = torch.zeros((w, e), dtype=torch.int64, device=self.experts.w_gate_up.device)
            status = torch.ones((w, 1), dtype=torch.int64, device=counts.device)
        # Column E carries each rank's input status, so an input error on one rank stops every rank at the counts.
        send = torch.cat([counts, status], dim=1)
        recv = torch.empty_like(send)
        self._mark("counts")
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        copied = None
        if send.device.type == "cuda":
            # NCCL: order the stream after the exchange and queue the copy of the split sizes into pinned memory now;
            # the host blocks on the event only in ``send`` (after the caller has queued its own work).
            work.wait()
            host = torch.empty((3, w), dtype=torch.int64, pin_memory=True)
            host.copy_(_splits(send, recv, e), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()

        def counts_ready() -> bool:
            return copied.query() if copied is not None else work.is_completed()

        def send_rows():
            self._mark("counts_wait")
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
            m = sum(recv_splits)
            # Local expert of every received row: blocks (source, expert) in source-major order. output_size: no
            # sync.
            local_ids = torch.repeat_interleave(torch.arange(e, device=hidden.device).repeat(w),
                                                recv[:, :e].reshape(-1), output_size=m)
            self._mark("dispatch_issue")
            box: list = []
            received = _AllToAll.apply(rows[: sum(send_splits)], recv_splits, send_splits, self.group, box)

            def finish() -> Dispatched:
                self._mark("dispatch_done")
                return Dispatched(received, local_ids, routing, logits, send_splits, recv_splits, perm, hidden, shape)

            return box[0], finish

        handle = DispatchHandle(send_rows, counts_ready)
        if error is not None:
            handle.send()  # raises on this rank (every other rank raises when it sends)
        return handle

    def run_experts(self, dispatched: Dispatched) -> torch.Tensor:
        """This rank's experts on the received rows: [M, Dm] in the order of ``dispatched.rows`` (no weights yet)."""
        self._mark("experts")
        rows, ids = dispatched.rows, dispatched.local_expert_ids
        grouped, perm = moe_permute(rows, ids[:, None], num_local_experts=self.num_local_experts,
                                    backend=self._backends["moe_permute"])
        out = moe_grouped_swiglu(grouped, perm.offsets, self.experts.w_gate_up, self.experts.w_down,
                                 backend=self._backends["moe_grouped_swiglu"])
        ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        return moe_unpermute(out, perm, ones, backend=self._backends["moe_unpermute"])  # x 1.0: exact

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> CombineHandle:
        """Send the expert results back to the tokens' ranks (async); ``handle.wait()`` applies the routing weights,
        adds the zero-expert term and returns ``y`` with the shape of the ``x`` given to :meth:`dispatch`.

        Raises:
            TypeError: ``dispatched`` is not a :class:`Dispatched` (e.g. the handle itself instead of its ``wait()``).
            ValueError: ``expert_out`` is not [M, Dm] for the M rows of ``dispatched``.
        """
        d = dispatched
        if not isinstance(d, Dispatched):
            raise TypeError(f"{_NAME}: combine takes the Dispatched that dispatch(...).wait() returns, got "
                            f"{type(d).__name__}" + (" (call .wait() on it first)" if isinstance(d, DispatchHandle)
                                                     else ""))
        if tuple(expert_out.shape) != tuple(d.rows.shape):
            raise ValueError(f"{_NAME}: expert_out must be [M, Dm] = {tuple(d.rows.shape)}, got "
                             f"{tuple(expert_out.shape)}")
        self._mark("combine_issue")
        box: list = []
        back = _AllToAll.apply(expert_out, d.send_splits, d.recv_splits, self.group, box)

        def finish() -> torch.Tensor:
            self._mark("combine_done")
            r = d.routing
            y = moe_unpermute(back, d._permutation, r.topk_weights, zero_weight=r.zero_weight, hidden=d._hidden,
                              backend=self._backends["moe_unpermute"])
            y = y.view(d._shape)
            self._mark("unpermute_done")
            return y

        return CombineHandle(box[0], finish)

    def forward(self, x: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
                return_router_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        d = self.dispatch(x, padding_mask=padding_mask).wait()
        y = self.combine(self.run_experts(d), d).wait()
        return (y, d.router_logits) if return_router_logits else y

    def update_bias(self) -> None:
        """Feed the counts gathered since the last call to the balancer (all-reduced over its process group). Call on
        every rank, once per optimizer step."""
        if not self.balance:
            return
        self.balancer.update(self.pending_counts)
        self.pending_counts.zero_()

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
