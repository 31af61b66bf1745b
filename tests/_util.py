"""Shared helpers for the tests: a tiny float64 model, fixed batches, lockstep runs."""

from __future__ import annotations

import copy

import torch


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float64, batch: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 5, generator=gen, dtype=dtype), torch.randn(batch, 3, generator=gen, dtype=dtype))
        for _ in range(n)
    ]


def loss_fn(model, xy):
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def train(model, opt, data, steps=None):
    for xy in data[:steps]:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (b the reference)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def max_param_rel_diff(m1, m2) -> float:
    return max(rel_diff(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def lockstep(make_ref, make_ours, steps=200, seed=0):
    """Train two copies of the same model on the same batches; return both models."""
    ref_model = tiny_mlp(seed)
    our_model = copy.deepcopy(ref_model)
    ref, ours = make_ref(ref_model.parameters()), make_ours(our_model.parameters())
    data = batches(steps)
    train(ref_model, ref, data)
    train(our_model, ours, data)
    return ref_model, our_model
