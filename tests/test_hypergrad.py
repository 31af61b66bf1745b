"""The engine's one-step hyper-gradient equals central finite differences of L(θ_t(c)).

At a random state (random moments, random interior coefficients), step t maps c to θ_t(c); the
engine reports h_k = ⟨∇L(θ_t), ∂θ_t/∂c_k⟩ at step t+1. We rebuild step t from a checkpoint with
c_k ± ε and difference the loss. float64, relative error <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from _util import assert_close, engine_and_fd

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

ALL5 = ("beta1", "beta2", "beta3", "c", "rho")
CASES = {
    "max": (MADA(betas=(0.9, 0.99), learn=ALL5), {"lr": 1e-2}),
    "mean+lion+wd+per_moment": (
        MADA(betas=(0.9, 0.99), second_moment="mean", lion=True, bias_correction="per_moment", learn=ALL5 + ("gamma",)),
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
    "first-difference-zero": (MADA(betas=(0.9, 0.99), initial_grad="first", learn=ALL5), {"lr": 3e-3, "eps": 1e-6}),
    # AVGrad's running mean without Lion, so that the native kernel's mean tangents are checked too
    "mean+wd": (MADA(betas=(0.9, 0.99), second_moment="mean", learn=ALL5), {"lr": 1e-2, "weight_decay": 0.1}),
}


#: (case, path) pairs: the native path where MADA's C kernel covers the case (no Lion term)
CASE_PATHS = [
    (case, path) for case in CASES for path in ("fused", "generic", "native")
    if path != "native" or CASES[case][0].native_rule(ALL5) is not None
]


@pytest.mark.parametrize(("case", "path"), CASE_PATHS, ids=[f"{c}-{p}" for c, p in CASE_PATHS])
@pytest.mark.parametrize("seed", [0, 1])
def test_mada_hypergradient_matches_finite_differences(case, seed, path):
    family, group = CASES[case]
    h, fd = engine_and_fd(family, group, seed=seed, path=path)
    assert_close(h, fd)


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_official_preset_hypergradient_is_exact_except_through_the_detached_mean(seed, path):
    # The authors' code treats the AVGrad mean as a constant in the hyper-gradient. Coefficients
    # that do not feed the mean (β1, ρ, γ) get the true derivative; β2, β3 and c, which move ṽ and
    # hence the mean, do not — the preset reproduces that on purpose.
    h, fd = engine_and_fd(MADA(preset="official"), {"lr": 1e-2}, seed=seed, path=path)
    exact = {k: fd[k] for k in ("beta1", "rho", "gamma")}
    assert_close({k: h[k] for k in exact}, exact)
    assert abs(h["beta2"] - fd["beta2"]) > 1e-3 * abs(fd["beta2"])


@pytest.mark.parametrize("path", ["fused", "generic", "native"])
def test_hypergradient_uses_the_learning_rate_of_step_t(path):
    family, group = CASES["max"]
    h, fd = engine_and_fd(family, group, seed=3, new_lr=1e-4, path=path)
    assert_close(h, fd)


def test_forward_mode_path_matches_finite_differences():
    # The generic path for rules that are not elementwise: torch.func.jacfwd.
    family = MADA(betas=(0.9, 0.99), learn=ALL5)
    family.elementwise = False
    h, fd = engine_and_fd(family, {"lr": 1e-2}, seed=4, warm=2, path="generic")
    assert_close(h, fd)


@pytest.mark.parametrize("path", ["fused", "generic", "native"])
def test_zero_gradient_rows_keep_hypergradient_finite(path):
    """An embedding whose rows for absent tokens never get a gradient: v stays 0 there and a
    naive sqrt derivative would make every coefficient NaN. The update itself must still be
    Adam's exactly."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1)).double()

    ours, ref = make(), make()
    opt = MetaOptimizer(ours.parameters(), MADA().at("adam"), hypergrad=OneStep(lr=1e-2), lr=1e-2, path=path)
    frozen = MetaOptimizer(ref.parameters(), MADA().at("adam"), hypergrad=OneStep(lr=0.0), lr=1e-2, path=path)
    adam_model = make()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randint(0, 5, (8, 3), generator=gen)  # tokens 5..9 never appear
        y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
        for m, o in ((ours, opt), (ref, frozen), (adam_model, adam)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for v in opt.coefficients.values():
        assert torch.isfinite(v)
    for v in list(opt.last_hypergrad.values()) + list(frozen.last_hypergrad.values()):
        assert torch.isfinite(v)
    assert float(opt.skipped_hypersteps) == 0
    assert any(abs(v.item()) > 0 for v in opt.last_hypergrad.values())
    assert opt.coefficients["beta3"].item() > 0  # the hyper-step did act
    for p, q in zip(ref.parameters(), adam_model.parameters()):
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-6
    assert torch.equal(ref[0].weight[5:], adam_model[0].weight[5:])
