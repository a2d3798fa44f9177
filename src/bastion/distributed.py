"""Multi-process training and evaluation on `torch.distributed` (launched with `torchrun`).

Bastion reads the standard torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
and initializes the process group itself: gloo on CPU, NCCL on GPU. Within a process group

* training splits every global batch across the ranks and averages gradients with one
  all-reduce per step (the result equals single-process training on the whole batch, up to the
  floating-point order of the reduction); the model starts from rank 0's weights;
* checkpoints and reports are written by rank 0 only; the loop state is global (epoch, batch,
  step), so a run can be resumed with another number of processes.

Gradients are averaged explicitly rather than through the DistributedDataParallel wrapper
because adversarial objectives run several forward passes per optimizer step (the inner attack),
which DDP's reducer does not allow; the arithmetic is the same as DDP's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def init_from_env() -> tuple[int, int]:
    """Initialize the process group from torchrun's variables if needed; return (rank, world size)."""
    if in_group():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def in_group() -> bool:
    """Whether this process is in an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group (a no-op outside one).

    Tears the group down explicitly: a gloo group left to the interpreter's exit can be destroyed
    while its worker threads still run, and the process then aborts ("terminate called without an
    active exception") after its work is done. No barrier here: the commands end with one, and a
    rank leaving on an error must not wait for ranks that will never arrive (torchrun stops them).
    """
    if in_group():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) outside one."""
    if in_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s parameters and buffers."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_gradients(params: Iterable[nn.Parameter], weight: float) -> None:
    """grad <- sum over ranks of (weight_r * grad_r): one flat all-reduce for all parameters.

    With ``weight = local batch / global batch`` this is the gradient of the mean loss over the
    global batch, even when the last batch does not split evenly.
    """
    if world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few Python numbers over the ranks (for metrics)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard_indices(n: int) -> Tensor:
    """The indices of `n` items this rank handles (contiguous blocks, rank order)."""
    rank, size = world()
    per = -(-n // size)
    return torch.arange(rank * per, min(n, (rank + 1) * per))


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate a tensor of per-rank rows (possibly of different lengths) in rank order."""
    rank, size = world()
    if size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    maxn = int(max(s.item() for s in sizes))
    padded = torch.zeros((maxn, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
