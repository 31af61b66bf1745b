"""MADA under torch.distributed: DDP or FSDP2, unchanged optimizer code.

    torchrun --nproc-per-node 2 examples/ddp.py            # DDP
    torchrun --nproc-per-node 2 examples/ddp.py --fsdp2    # FSDP2 (fully_shard)

CPU processes talk over gloo, GPUs over NCCL. With DDP every rank holds the averaged gradient,
so every rank computes the same hyper-gradient and the optimizer communicates nothing. With
FSDP2 each rank holds a shard of every parameter, its gradient and its optimizer state; the
hyper-gradient's dot products are partial sums, which the optimizer all-reduces (K numbers, once
per step). The script prints each rank's learned coefficients: they are identical.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdp2", action="store_true", help="shard with fully_shard instead of DDP")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(device)
    if args.fsdp2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
        net = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.01), lr=3e-3)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own share of the data
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(7))
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = torch.sin(x @ w_true)
        loss = torch.nn.functional.mse_loss(net(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    coefficients = {k: round(v.item(), 6) for k, v in opt.coefficients.items()}
    line = f"rank {rank}/{world} ({'FSDP2' if args.fsdp2 else 'DDP'}): loss {loss.item():.4f}, coefficients {coefficients}\n"
    sys.stdout.write(line)  # one write per line: the ranks share the terminal
    sys.stdout.flush()
    dist.destroy_process_group()
    return coefficients


if __name__ == "__main__":
    main()
