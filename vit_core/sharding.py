"""Splitting a job over the processes `torchrun` starts (one machine or several), and gathering
what each did back on rank 0.

    torchrun --nproc-per-node 4 -m vit_core.cli.faithfulness --checkpoint DIR --data DIR

`join()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): without it, one process is
the whole job and nothing is initialised. A job cut into pieces (chunks of images) gives each rank
one contiguous run of pieces (`Shard.pieces`); `Shard.gather` hands rank 0 every rank's result in
rank order, so concatenating them gives exactly the order one process would have made. The process
group uses gloo on the CPU and NCCL on CUDA devices (each rank on the GPU of its LOCAL_RANK).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank `rank` of `world` processes."""
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def pieces(self, n_pieces: int) -> range:
        """The indices of this rank's pieces out of `n_pieces`: a contiguous run, the runs of ranks
        0, 1, ... following each other and differing in length by at most one."""
        return range(self.rank * n_pieces // self.world, (self.rank + 1) * n_pieces // self.world)

    def gather(self, value) -> list | None:
        """Every rank's `value` (picklable) on rank 0, in rank order; None on the other ranks."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare "cuda" means this process's GPU (LOCAL_RANK); anything else as given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def join(device: torch.device) -> Shard:
    """This process's Shard: joins torchrun's process group when WORLD_SIZE > 1 (gloo, or NCCL for a
    CUDA `device`), else the whole job in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def leave(shard: Shard) -> None:
    """Close the process group `join` opened (a no-op for one process)."""
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
