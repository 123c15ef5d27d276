"""Data parallelism across processes (``torchrun --nproc_per_node=N``): gloo on CPU, nccl on GPU.

Each process holds the whole frozen model and the same adapters, reads its own slice of every
global batch (:mod:`peftkit.data.pipeline`), and computes gradients on it. Once per optimiser step
the gradients of the *trainable* tensors only are summed across processes in one flat
``all_reduce`` (for a soft prompt that is a few thousand numbers; the frozen base model is never
communicated), together with the step's loss sums and token counts. Since every process divides its
loss by the *global* label-token count before the backward pass, the summed gradient is exactly the
gradient of one process on the whole global batch: this is what ``DistributedDataParallel`` does,
with its all-reduce moved to the optimiser step (so gradient accumulation needs no ``no_sync``).

Only rank 0 writes files (checkpoints, metrics, the final adapter) and shows progress.

Collectives run on the backend's device: NCCL communicates CUDA tensors only, so every tensor a
collective sees (gradients, loss sums, token counts, stop flags) is moved to the process's GPU
first and the result moved back; gloo communicates CPU tensors.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peftkit.device import resolve_device


@dataclass
class Distributed:
    """This process's place in the job (``world_size == 1``: a single process, no communication)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False
    device_setting: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto") -> Distributed:
        """Join the process group ``torchrun`` describes in ``RANK`` / ``WORLD_SIZE`` (if > 1).

        ``device`` is the run's setting (``auto | cpu | cuda | cuda:N``): NCCL when it resolves to a
        GPU, gloo on the CPU.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device_setting=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        created = False
        if not dist.is_initialized():
            target = resolve_device(device, local_rank)
            backend = "nccl" if target.type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(target)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            created = True
        return cls(rank, world_size, local_rank, created, device)

    def device(self) -> torch.device:
        """This process's device: the run's setting, resolved (``auto``: its GPU if there is one)."""
        return resolve_device(self.device_setting, self.local_rank)

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors must live: the GPU under NCCL, the CPU under gloo."""
        if self.enabled and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` across processes, in place; returns it."""
        if self.enabled:
            moved = tensor.to(self.comm_device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def sum_gradients_and(self, params: Sequence[nn.Parameter], extra: Tensor) -> Tensor:
        """Sum every parameter's gradient (a missing one counts as zeros) and ``extra`` across
        processes in one ``all_reduce``; returns the summed ``extra``."""
        if not self.enabled:
            return extra
        device = self.comm_device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        pieces = [g.detach().to(device, torch.float32).reshape(-1) for g in grads]
        flat = torch.cat([*pieces, extra.to(device, torch.float32).reshape(-1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            n = param.numel()
            param.grad = flat[offset : offset + n].view_as(param).to(param.device, param.dtype).clone()
            offset += n
        return flat[offset:].to(extra.device, extra.dtype)

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Give every process rank 0's values of ``params``."""
        if self.enabled:
            with torch.no_grad():
                for param in params:
                    moved = param.data.to(self.comm_device)
                    dist.broadcast(moved, src=0)
                    if moved is not param.data:
                        param.data.copy_(moved)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_agree(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every process."""
        if not self.enabled:
            return flag
        value = torch.tensor([0.0 if flag else 1.0], device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value.item() == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()
