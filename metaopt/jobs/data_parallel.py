"""One run over many processes: data parallel under ``torchrun``, with DDP or FSDP2.

``torchrun --nproc-per-node N -m metaopt run CONFIG`` (or ``metaopt run --nproc N``, which starts
that) trains each run of the job on N processes (``distributed.nproc``, the world size; across
nodes, torchrun's world). Every process builds the same model from the run's seed and draws the
same batches from the run's generator; each takes its equal share of the rows of every batch
(`World.rows`), so the global batch is the config's ``batch_size``, whatever N is. With
``gradient_accumulation`` A, a process's share is cut again into A micro-batches, whose
gradients add up before the step.

``distributed.strategy``:

* ``ddp``: every process holds a replica; `DistributedDataParallel` averages the gradients in
  backward, so every process steps on the gradient of the whole batch, and a MetaOptimizer's
  hyper-gradient and coefficients are the same on all of them without any communication of its
  own.
* ``fsdp2``: ``fully_shard`` on every transformer block and on the model: each process holds a
  shard of every parameter, its gradient and its optimizer state (the engine's generic path; the
  hyper-gradient's dot products are all-reduced once per step). For models one device cannot
  hold. Checkpoints gather the full state on rank 0 (`full_state`) and shard it again on load.

The training loss recorded for a step is the mean over processes (one all-reduce of one number
per step, on the device); the validation loss likewise. Rank 0 alone writes: ``config.yaml``,
``metrics.jsonl``, checkpoints, the summary and plots, and the progress lines. The losses equal
those of one process on the same global batch up to the order of the float32 sums (the
gradients are averaged across processes, then within; tests/test_cli_torchrun.py says how far).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Tensor = torch.Tensor

@dataclass(frozen=True)
class World:
    """This process's place among those that train a run together: one, or torchrun's N."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    strategy: str = "ddp"

    @property
    def distributed(self) -> bool:
        """Whether several processes train each run."""
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory and prints (rank 0)."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This process's rows of a batch of ``batch_size`` (None: all of them, one process)."""
        if not self.distributed:
            return None
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: the GPU of its local rank when the job's is CUDA."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment has a rank and a world size)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def environment_world(strategy: str = "ddp") -> World:
    """The `World` torchrun's environment describes (one process outside torchrun)."""
    if not under_torchrun():
        return World(strategy=strategy)
    env = os.environ
    size = int(env["WORLD_SIZE"])
    return World(rank=int(env["RANK"]), size=size, local_rank=int(env.get("LOCAL_RANK", 0)),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", size)), strategy=strategy)


def start(world: World, device: torch.device) -> None:
    """Join the process group (NCCL between GPUs, gloo between CPU processes); nothing for one process."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


@contextlib.contextmanager
def joined(world: World, device: torch.device) -> Iterator[None]:
    """In the process group (`start`) while inside, out of it (`stop`) after; nothing for one process."""
    if not world.distributed:
        yield
        return
    start(world, world.device(device))
    try:
        yield
    finally:
        stop()


def stop() -> None:
    """Leave the process group, every model and optimizer gone first.

    gloo threads that still hold work when the interpreter tears down abort the process.
    """
    if dist.is_initialized():
        gc.collect()
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every process (nothing for one)."""
    if world.distributed:
        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every process (a picklable object)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(world: World, t: Tensor) -> Tensor:
    """``t`` averaged over the processes, in place (sum, then divide: gloo has no average)."""
    if world.distributed:
        dist.all_reduce(t)
        t.div_(world.size)
    return t


def wrap(world: World, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module a process trains through: the model itself, a `DistributedDataParallel`, or the model sharded in place.

    FSDP2 shards every transformer block (``model.blocks``) on its own, then the rest, so that
    one block's parameters are gathered at a time.
    """
    if not world.distributed:
        return model
    if world.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world.size,))
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(world: World, net: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's backward: reduce the gradients across processes only when ``sync`` (the last one)."""
    if world.distributed and world.strategy == "fsdp2":
        net.set_requires_gradient_sync(sync)
    with net.no_sync() if world.distributed and world.strategy == "ddp" and not sync else contextlib.nullcontext():
        yield


def full_state(world: World, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts with every tensor whole, on rank 0's CPU.

    DDP and one process: their own state dicts (every process holds all of it). FSDP2: gathered
    from the shards through ``torch.distributed.checkpoint.state_dict`` (every process must call
    it; ranks other than 0 get empty dicts). The optimizer's is then keyed by parameter name.
    """
    if world.strategy != "fsdp2" or not world.distributed:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_full_state(world: World, model: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict,
                    opt_state: dict) -> None:
    """Load `full_state`'s output (every process holds it): under FSDP2 each takes its shards again."""
    if world.strategy != "fsdp2" or not world.distributed:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, opt, opt_state, options=options)


def check_devices(cfg: Any) -> None:
    """Refuse ``distributed.nproc`` processes that this machine's devices cannot hold.

    One GPU per process when the job's device is CUDA; at least one core per process on a CPU.
    (Each process's ``threads``, unset, is filled in by the process itself: its share of its
    machine's cores.)

    Raises:
        ValueError: naming ``--nproc`` and what the machine has.
    """
    n = cfg.distributed.nproc
    device = cfg.resolved_device()
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if have < n:
            raise ValueError(f"--nproc {n} (distributed.nproc): this machine has {have} CUDA device{'s' if have != 1 else ''}, "
                             f"and each process needs one; use --nproc {max(have, 1)}, or start torchrun on each of several "
                             "machines (docs/cli.md#torchrun)")
    elif device.type != "cpu":
        raise ValueError(f"--nproc {n} (distributed.nproc): processes train together on cuda or cpu, not {device.type}")
    elif n > (cores := os.cpu_count() or 1):
        raise ValueError(f"--nproc {n} (distributed.nproc): this machine has {cores} CPU core{'s' if cores != 1 else ''}, "
                         f"and each process needs one at least; use --nproc {cores} or fewer")


def torchrun_command(nproc: int) -> list[str]:
    """The command that starts torchrun (``python -m torch.distributed.run``) for ``nproc`` processes here, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
