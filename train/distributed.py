"""Training under torchrun: every rank walks the same batches; each takes its share of a batch's
micro-batches, and the ranks add their gradients (an all-reduce) before the one optimiser step
they all take. The steps are then the one-process run's, up to float summation order.

``torchrun --nproc_per_node=N -m dpnet.train ...`` (or ``RANKS=N make train``): gloo on the CPU, NCCL
on CUDA (rank r on GPU ``LOCAL_RANK``). A rank reads only the rows of its micro-batches. Rank 0
owns the run folder: it locks it, writes the checkpoint, the log and the model; the others follow.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> bool:
    """Join torchrun's process group when it started several ranks (WORLD_SIZE > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def mine(index: int) -> bool:
    """Whether this rank does piece ``index`` of a step (pieces dealt round-robin)."""
    rank, size = world()
    return index % size == rank


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Add up the ranks' gradients of ``params`` in place (one all-reduce; a missing gradient counts as 0)."""
    if world()[1] <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    at = 0
    for p in params:
        p.grad.copy_(flat[at:at + p.numel()].view_as(p))
        at += p.numel()


def sum_numbers(values: list[float]) -> list[float]:
    """The ranks' ``values`` added up (for the epoch's counts and loss terms)."""
    if world()[1] <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
