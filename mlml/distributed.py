"""torch.distributed for runs launched by torchrun (single or multi-node); a no-op in one process.

Everything here is a collective: every rank must call it, in the same order, with tensors of the
same dtype (sizes along dim 0 may differ where said). Outside torch.distributed each function
returns its input unchanged, so callers need no `if distributed` branches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (nccl on GPU, gloo on CPU).

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python -m
    mlml` sets none of them and runs in one process. `timeout_s` bounds every collective, so a
    rank that died turns into an error on the others instead of a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across --max-restarts: without a per-attempt prefix a restarted
        # rank can read a dead rank's address from the previous attempt (gloo: connection refused).
        store = dist.PrefixStore(f"mlml/attempt{restart_count()}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def restart_count() -> int:
    """How many times torchrun (`--max-restarts`) has restarted this worker group; 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, in rank order, on every rank (on x's device).

    Sizes along dim 0 may differ between ranks; the other dims and the dtype may not. bool
    tensors travel as uint8 (gloo has no bool).
    """
    if not is_distributed():
        return x
    world = dist.get_world_size()
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = wire.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([p[:n] for p, n in zip(parts, counts)])
    return out.bool() if x.dtype == torch.bool else out


def gather_rows(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's per-sample rows `values` (B, ...) of positions `index` (B,), on every rank.

    Returns (unique positions (M,), their rows (M, ...)), sorted by position; where a position
    occurs more than once (the sampler's padding repeats a few samples on other ranks) the row
    of the highest rank wins, so writing the result is deterministic and the same everywhere.
    """
    index, values = all_gather_cat(index), all_gather_cat(values)
    unique, inverse = torch.unique(index, return_inverse=True)
    order = torch.arange(len(index), device=index.device)
    last = torch.full((len(unique),), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, inverse, order, reduce="amax")                   # last occurrence of each
    return unique, values[last]


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean over ranks) the gradients of parameters that DDP does not manage.

    For a method's own parameters (ROLE's label table, a domain head held by the method): each
    rank's loss is the mean over its share of the global batch, so the mean over ranks of the
    gradients is the gradient of the global-batch loss, as DDP computes it for the model. A
    parameter without a gradient on some rank counts as zero there; one without a gradient on
    every rank keeps `grad = None` (as DDP leaves globally unused parameters).
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present)
    world = dist.get_world_size()
    for p, n in zip(params, present.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def average_row_gradient(grad: torch.Tensor, rows: torch.Tensor) -> None:
    """In place, the mean over ranks of `grad` (N, ...), which on each rank is zero outside `rows`.

    Equal to all-reducing the dense gradient, but only the touched rows travel (about world_size x
    batch rows instead of N): for per-sample tables such as ROLE's. `rows` may repeat.
    """
    if not is_distributed():
        return
    rows = rows.unique()
    index, values = all_gather_cat(rows), all_gather_cat(grad[rows])
    grad.zero_()
    grad.index_add_(0, index, values)
    grad.div_(dist.get_world_size())


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts rank 0's buffers at the start of every forward (broadcast_buffers=True), but
    the forward itself then updates each rank's running statistics from its own shard; calling
    this after the optimiser step makes the whole model state identical at step boundaries, where
    the EMA teacher is updated, checkpoints are written and evaluation runs.
    """
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b.data)
    for buffers in by_dtype.values():                     # one broadcast per dtype, not per buffer
        flat = _flatten_dense_tensors(buffers)
        dist.broadcast(flat, src=0)
        for b, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            b.copy_(synced)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable object) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def min_over_ranks(x: int) -> int:
    """The smallest of every rank's integer `x`, on every rank."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def max_over_ranks(values: list[int]) -> list[int]:
    """Elementwise the largest of every rank's integers `values` (e.g. flags: any rank's 1 wins), on every rank."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the ranks that report it (logging; keys may differ between ranks)."""
    if not is_distributed():
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    keys = dict.fromkeys(k for g in gathered for k in g)                  # ordered union
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}
