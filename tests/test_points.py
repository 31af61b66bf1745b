"""Each named point of MADA equals a reference optimizer written by someone else.

float64, 200 steps on a small MLP, max relative parameter difference <= 1e-6. Each point is run
with fixed coefficients and with hyper-gradients on (hyper-lr 0, so the coefficients stay put
while the tangents are computed), on the fused, native and generic paths.
"""

from __future__ import annotations

import pytest
import pytorch_optimizer
import torch
from _util import lockstep, max_param_rel_diff

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

TOL = 1e-6
HYPERGRAD = {
    "fixed": (None, "fused"),
    "hypergrad-fused": (OneStep(lr=0.0), "fused"),
    "hypergrad-generic": (OneStep(lr=0.0), "generic"),
    "fixed-native": (None, "native"),
    "hypergrad-native": (OneStep(lr=0.0), "native"),
}


def check(make_ref, family, hypergrad, **group):
    hypergrad, path = hypergrad
    ref, ours = lockstep(make_ref, lambda p: MetaOptimizer(p, family, hypergrad=hypergrad, path=path, **group))
    diff = max_param_rel_diff(ours, ref)
    assert diff <= TOL, diff
    # The run must have moved the parameters, or equality says nothing.
    from _util import tiny_mlp

    moved = max_param_rel_diff(ref, tiny_mlp(0))
    assert moved > 1e-2, moved


def _avgrad_reference(params, lr, betas, eps, data_steps):
    """AVGrad as the MADA paper defines it: Adam whose denominator uses the running arithmetic
    mean of the second-moment EMA over steps 1..t."""
    b1, b2 = betas
    state = {}

    class Ref:
        def zero_grad(self):
            for p in params:
                p.grad = None

        @torch.no_grad()
        def step(self):
            for p in params:
                s = state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p), "mean": torch.zeros_like(p)})
                s["t"] += 1
                t = s["t"]
                s["m"] = b1 * s["m"] + (1 - b1) * p.grad
                s["v"] = b2 * s["v"] + (1 - b2) * p.grad**2
                s["mean"] = s["mean"] + (s["v"] - s["mean"]) / t
                p -= lr * (s["m"] / (1 - b1**t)) / ((s["mean"] / (1 - b2**t)).sqrt() + eps)

    return Ref()


#: point -> (reference optimizer, MADA at that point, group hyperparameters)
POINTS = {
    "adam vs torch Adam": (
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8),
        MADA(betas=(0.9, 0.99)).at("adam"),
        {"lr": 1e-2, "eps": 1e-8},
    ),
    "adam+weight decay vs torch AdamW": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1),
        MADA().at("adam"),
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
    "amsgrad vs torch Adam(amsgrad)": (
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), amsgrad=True),
        MADA(betas=(0.9, 0.99)).at("amsgrad"),
        {"lr": 1e-2},
    ),
    # pytorch-optimizer's Yogi starts m and v at initial_accumulator=1e-6: initial_m/initial_v.
    "yogi vs pytorch-optimizer Yogi": (
        lambda p: pytorch_optimizer.Yogi(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-3, initial_accumulator=1e-6),
        MADA(initial_m=1e-6, initial_v=1e-6).at("yogi"),
        {"lr": 1e-2, "eps": 1e-3},
    ),
    # pytorch-optimizer's Adan betas (b1, b2, b3) = (0.98, 0.92, 0.99): its b2 (gradient
    # difference) is MADA's β3, its b3 (second moment) is MADA's β2. It takes the first
    # difference as zero and bias-corrects each moment separately.
    "adan vs pytorch-optimizer Adan": (
        lambda p: pytorch_optimizer.Adan(p, lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8),
        MADA(betas=(0.98, 0.99), initial_grad="first", bias_correction="per_moment").at("adan"),
        {"lr": 1e-2},
    ),
    "lion vs pytorch-optimizer Lion": (
        lambda p: pytorch_optimizer.Lion(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01),
        MADA(lion=True, lion_betas=(0.9, 0.99)).at("lion"),
        {"lr": 1e-3, "weight_decay": 0.01},
    ),
    "avgrad vs running-mean Adam": (
        lambda p: _avgrad_reference(list(p), 1e-2, (0.9, 0.999), 1e-8, None),
        MADA(second_moment="mean").at("avgrad"),
        {"lr": 1e-2},
    ),
}


#: every point on every path, but Lion not on the native path (MADA's C kernel has no Lion term)
CASES = [(point, mode) for point in POINTS for mode in HYPERGRAD if not (point.startswith("lion") and "native" in mode)]


@pytest.mark.parametrize(("point", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_named_point_equals_its_reference(point, mode):
    make_ref, family, group = POINTS[point]
    check(make_ref, family, HYPERGRAD[mode], **group)


def test_points_table():
    assert set(MADA().points) == {"adam", "amsgrad", "yogi", "adan"}
    assert set(MADA(second_moment="mean").points) == {"adam", "avgrad", "yogi", "adan"}
    assert set(MADA(lion=True).points) == {"adam", "amsgrad", "yogi", "adan", "lion"}
    with pytest.raises(KeyError, match="lion"):
        MADA().at("lion")
