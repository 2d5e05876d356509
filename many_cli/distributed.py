"""Work across torchrun processes: joining the process group, and tensors sent from one rank
to another with their shapes (no pickling: ranks exchange only tensors)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from many_cli.models import resolve_device


@dataclass(frozen=True)
class World:
    """This process among torchrun's: its rank, how many ranks there are, and the device it
    computes on (resolved from --device once, here)."""

    rank: int
    size: int
    device: torch.device

    def leave(self) -> None:
        """Wait for every rank, then leave the process group (nothing to do for one process)."""
        if self.size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def join_world(device: str) -> World:
    """This process's World: under torchrun, it joins the process group (gloo on CPU, NCCL on
    CUDA) and computes on its own GPU (LOCAL_RANK) when --device resolves to CUDA."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    compute = resolve_device(device)
    if size <= 1:
        return World(0, 1, compute)
    if compute.type == "cuda":
        compute = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        if compute.type == "cuda":
            torch.cuda.set_device(compute)  # NCCL sends from, and collects on, this rank's GPU
        torch.distributed.init_process_group("nccl" if compute.type == "cuda" else "gloo")
    return World(torch.distributed.get_rank(), size, compute)


def _wire_device() -> torch.device:
    """Where tensors must be to travel: NCCL sends from the rank's GPU, gloo from the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send_tensors(tensors: Sequence[torch.Tensor], destination: int) -> None:
    """Send float64 tensors of at most two dimensions to `destination`: their count, their
    shapes, then each tensor."""
    device = _wire_device()
    shapes = [[tensor.dim(), *tensor.shape, *[1] * (2 - tensor.dim())] for tensor in tensors]
    if any(rank > 2 for rank, *_ in shapes):
        raise ValueError("send_tensors sends tensors of at most two dimensions")
    torch.distributed.send(torch.tensor([len(tensors)], device=device), destination)
    if tensors:
        torch.distributed.send(torch.tensor(shapes, device=device), destination)
    for tensor in tensors:
        torch.distributed.send(tensor.to(device, torch.float64).contiguous(), destination)


def receive_tensors(source: int) -> list[torch.Tensor]:
    """What `send_tensors` sent from `source`, as float64 tensors on the CPU."""
    device = _wire_device()
    count = torch.zeros(1, dtype=torch.int64, device=device)
    torch.distributed.recv(count, source)
    if not int(count):
        return []
    shapes = torch.zeros(int(count), 3, dtype=torch.int64, device=device)
    torch.distributed.recv(shapes, source)
    received = []
    for rank, *dims in shapes.tolist():
        tensor = torch.empty(dims[:rank], dtype=torch.float64, device=device)
        torch.distributed.recv(tensor, source)
        received.append(tensor.cpu())
    return received


def all_gather_json(value: object) -> list:
    """Every rank's `value` (anything JSON writes), in rank order, exchanged as UTF-8 bytes in a
    tensor: what ranks tell each other is data, never a pickle."""
    device = _wire_device()
    data = torch.tensor(list(json.dumps(value, sort_keys=False).encode()), dtype=torch.uint8, device=device)
    return [json.loads(bytes(part.tolist()).decode()) for part in _all_gather_variable(data)]


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's float32 rows (each rank's count may differ, zero included), concatenated in
    rank order on the CPU."""
    return torch.cat([part.cpu() for part in _all_gather_variable(rows.to(_wire_device(), torch.float32))])


def _all_gather_variable(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's `tensor`, whose first dimension may differ between ranks (the rest may not)."""
    world = torch.distributed.get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(each) for each in sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return [part[: int(each)] for part, each in zip(gathered, sizes)]
