"""The hyper-optimizer of a family that chooses none: steps set by the box, not by |h|.

A coefficient whose hyper-gradient is 1e-9 must learn as a coefficient whose hyper-gradient is
1 does (issue 21: a second-moment coefficient's tangent carries a factor of 1-β2, and under
hyper-SGD it never moved), and no single hyper-step may move a coefficient by more than
``max_move`` of its box. The box-relative settings (``lr_scale="box"``, ``max_move``) are
checked on both branches of the hyper-step, on per-group rows and on float32 coefficients.
"""

from __future__ import annotations

import pytest
import torch
from _util import host_reads_forbidden
from pydantic import ValidationError

from metaopt import Coefficient, CoefficientSpace, Family, Forward, MetaOptimizer, OneStep, Unrolled
from metaopt.hyper import update as hyper_update
from metaopt.plugins.hd import AdamHD, SGDHD
from metaopt.plugins.mada import MADA

SCALE = 1e-9


class TwoScales(Family):
    """Δ = -η (a + 1e-9 b) g: b's hyper-gradient is 1e-9 times a's, on a box 4 times as wide.

    It defines no ``default_hypergrad``: it gets the engine's.
    """

    name = "two_scales"
    elementwise = True

    def __init__(self):
        self.space = CoefficientSpace(a=Coefficient(init=0.2, low=0.0, high=1.0),
                                      b=Coefficient(init=0.8, low=0.0, high=4.0))

    def init(self, param, grad, group):
        return {}

    def update(self, grad, param, state, coefficients, group, step):
        return -group["lr"] * (coefficients["a"] + SCALE * coefficients["b"]) * grad, {}


def _problem(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen, dtype=dtype)
    y = x @ torch.randn(8, 1, generator=gen, dtype=dtype)
    return x, y


def _train(opt, w, x, y, steps):
    """The coefficients after each of ``steps`` steps (one row per step, the start first)."""
    rows = [torch.stack(list(opt.coefficients.values()))]
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(x @ w, y).backward()
        opt.step()
        rows.append(torch.stack(list(opt.coefficients.values())))
    return torch.stack(rows)


def _widths(family):
    return torch.tensor([family.space[n].high - family.space[n].low for n in family.space.learned], dtype=torch.float64)


def _space(**boxes):
    return CoefficientSpace({n: Coefficient(init=init, low=lo, high=hi) for n, (init, lo, hi) in boxes.items()})


def _record(config, space, dtype=torch.float64):
    return hyper_update.init_state(config, space, space.learned, dtype, "cpu")


# -- the default --------------------------------------------------------------------------------
def test_a_family_without_its_own_default_gets_the_scale_free_one():
    w = torch.nn.Parameter(torch.zeros(8, 1))
    assert MetaOptimizer([w], TwoScales(), lr=0.1).hypergrad == OneStep.scale_free()
    assert Family().default_hypergrad() == OneStep.scale_free()
    assert OneStep.scale_free().lr_scale == "box" and OneStep.scale_free().max_move is not None


def test_mada_and_the_hd_families_keep_their_own_defaults():
    w = torch.nn.Parameter(torch.zeros(3))
    for family in (MADA(), SGDHD(), AdamHD()):
        chosen = MetaOptimizer([w], family).hypergrad
        assert chosen == family.default_hypergrad() != OneStep.scale_free()
    assert SGDHD().default_hypergrad() == SGDHD.paper_hypergrad()
    assert AdamHD().default_hypergrad() == AdamHD.paper_hypergrad()


def test_scale_free_builds_every_mode_and_takes_overrides():
    assert isinstance(Forward.scale_free(decay=0.5), Forward) and Forward.scale_free(decay=0.5).decay == 0.5
    assert isinstance(Unrolled.scale_free(), Unrolled)
    tuned = OneStep.scale_free(warmup=10)
    assert tuned.warmup == 10 and tuned.model_copy(update={"warmup": 0}) == OneStep.scale_free()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_whose_hypergradients_differ_by_1e9_both_learn_and_none_jumps(dtype):
    """Under the default both coefficients cover comparable fractions of their boxes, and every
    step's move stays within ``max_move`` of the box. Under hyper-SGD b could not move at all."""
    x, y = _problem(dtype=dtype)
    w = torch.zeros(8, 1, dtype=dtype, requires_grad=True)
    family = TwoScales()
    opt = MetaOptimizer([w], family, lr=0.05)
    rows = _train(opt, w, x, y, 60).double()
    h = torch.stack(list(opt.last_hypergrad.values())).double().abs()
    assert h[1] < 1e-7 * h[0] and h[1] > 0  # the two scales are really 1e9 apart
    widths = _widths(family)
    moved = (rows[-1] - rows[0]).abs() / widths
    assert (moved > 0.01).all(), moved  # both crossed more than 1% of their boxes
    assert moved.max() < 2 * moved.min(), moved  # comparable
    steps = (rows[1:] - rows[:-1]).abs() / widths
    bound = opt.hypergrad.max_move
    assert (steps <= bound * (1 + 1e-5)).all(), steps.max(0).values
    assert opt.skipped_hypersteps.item() == 0


def test_under_the_old_default_the_small_coefficient_stays():
    """What the issue saw, kept as a reason for the default: hyper-SGD moves b by less than
    float32 resolution."""
    x, y = _problem()
    w = torch.zeros(8, 1, requires_grad=True)
    opt = MetaOptimizer([w], TwoScales(), hypergrad=OneStep(), lr=0.05)
    rows = _train(opt, w, x, y, 60)
    assert rows[-1, 0] != rows[0, 0] and rows[-1, 1] == rows[0, 1]


def test_per_group_rows_learn_scale_free_and_bounded():
    x, y = _problem(3)
    w1 = torch.zeros(4, 1, requires_grad=True)
    w2 = torch.zeros(4, 1, requires_grad=True)
    family = TwoScales()
    opt = MetaOptimizer([{"params": [w1]}, {"params": [w2], "lr": 0.01}], family, lr=0.05, coefficients="per_group")
    rows = [torch.stack(list(opt.coefficients.values()), -1)]  # (groups, K)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.mse_loss(x[:, :4] @ w1 + x[:, 4:] @ w2, y).backward()
        opt.step()
        rows.append(torch.stack(list(opt.coefficients.values()), -1))
    rows = torch.stack(rows).double()  # (steps + 1, groups, K)
    widths = _widths(family)
    moved = (rows[-1] - rows[0]).abs() / widths
    assert (moved > 0.005).all(), moved  # each group's a and b
    steps = (rows[1:] - rows[:-1]).abs() / widths
    assert (steps <= opt.hypergrad.max_move * (1 + 1e-5)).all()


# -- the fields, on the hyper-step itself ------------------------------------------------------
def test_new_fields_are_validated():
    for bad in ({"max_move": 0.0}, {"max_move": -0.1}, {"max_move": 1.5}, {"lr_scale": "log"}):
        with pytest.raises(ValidationError):
            OneStep(**bad)
    assert OneStep(max_move=1.0).max_move == 1.0


def test_plain_settings_are_the_documented_formula_on_a_wide_box():
    """Without the new fields lr is absolute and nothing bounds the move but the box (MADA's
    and every explicit OneStep(...)'s step is unchanged)."""
    space = _space(a=(10.0, 0.0, 50.0))
    state = _record(OneStep(lr=0.5, momentum=0.5), space)
    state = hyper_update.step(OneStep(lr=0.5, momentum=0.5), state, torch.tensor([4.0], dtype=torch.float64))
    state = hyper_update.step(OneStep(lr=0.5, momentum=0.5), state, torch.tensor([2.0], dtype=torch.float64))
    assert state.coefficients.item() == 10.0 - 0.5 * 4.0 - 0.5 * (0.5 * 4.0 + 2.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_box_lr_is_the_absolute_lr_times_the_box_width(optimizer):
    space = _space(a=(0.5, 0.0, 1.0), b=(30.0, -50.0, 50.0), c=(0.01, 0.0, 0.02))
    widths = {"a": 1.0, "b": 100.0, "c": 0.02}
    box = OneStep(optimizer=optimizer, lr=1e-3, lr_scale="box")
    absolute = OneStep(optimizer=optimizer, lr={n: 1e-3 * w for n, w in widths.items()})
    s_box, s_abs = _record(box, space), _record(absolute, space)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        h = torch.randn(3, generator=gen, dtype=torch.float64)
        s_box, s_abs = hyper_update.step(box, s_box, h), hyper_update.step(absolute, s_abs, h)
    torch.testing.assert_close(s_box.coefficients, s_abs.coefficients, rtol=1e-15, atol=0)
    assert not torch.equal(s_box.coefficients, torch.tensor([0.5, 30.0, 0.01], dtype=torch.float64))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("lr_scale", ["absolute", "box"])
def test_max_move_holds_under_a_huge_hypergradient_and_a_huge_lr(optimizer, lr_scale):
    space = _space(a=(0.5, 0.0, 1.0), b=(0.0, -300.0, 100.0))
    config = OneStep(optimizer=optimizer, lr=1e6, lr_scale=lr_scale, max_move=0.05, momentum=0.9)
    state = _record(config, space)
    widths = torch.tensor([1.0, 400.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for t in range(30):
        h = torch.randn(2, generator=gen, dtype=torch.float64) * 1e30 * (1 if t % 7 else -1)
        new = hyper_update.step(config, state, h)
        move = (new.coefficients - state.coefficients).abs()
        assert (move <= 0.05 * widths * (1 + 1e-12)).all(), move
        assert (move > 0).any()
        assert ((new.coefficients >= space_low(space)) & (new.coefficients <= space_high(space))).all()
        state = new
    assert state.skipped.item() == 0


def space_low(space):
    return torch.tensor([space[n].low for n in space.names], dtype=torch.float64)


def space_high(space):
    return torch.tensor([space[n].high for n in space.names], dtype=torch.float64)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_non_finite_hypergradient_is_still_skipped_with_a_bound(optimizer):
    space = _space(a=(0.5, 0.0, 1.0))
    config = OneStep(optimizer=optimizer, lr=1e-2, lr_scale="box", max_move=0.1)
    state = _record(config, space)
    new = hyper_update.step(config, state, torch.tensor([float("nan")], dtype=torch.float64))
    assert torch.equal(new.coefficients, state.coefficients) and new.skipped.item() == 1


def test_every_scale_free_step_is_lr_times_the_box_whatever_the_scale():
    """Each step moves by lr·(high - low) against the sign of h, for |h| from 1e3 down to 1e-12;
    with Adam's usual ε = 1e-8 a hyper-gradient of 1e-12 would move 1e-4 as far."""
    config = OneStep.scale_free()
    space = _space(c0=(0.5, 0.0, 1.0), c1=(5.0, 0.0, 10.0), c2=(0.05, 0.0, 0.1), c3=(0.0, -1.0, 1.0))
    widths = torch.tensor([1.0, 10.0, 0.1, 2.0], dtype=torch.float64)
    state = _record(config, space)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        signs = torch.randint(0, 2, (4,), generator=gen, dtype=torch.float64) * 2 - 1
        h = signs * torch.tensor([1e3, 1.0, 1e-9, 1e-12], dtype=torch.float64)
        new = hyper_update.step(config, state, h)
        move = new.coefficients - state.coefficients
        torch.testing.assert_close(move, -config.lr * widths * signs, rtol=1e-6, atol=0)
        state = new
    usual = config.model_copy(update={"eps": 1e-8})
    h = torch.tensor([1.0, 1.0, 1.0, -1e-12], dtype=torch.float64)
    small = hyper_update.step(usual, _record(usual, space), h).coefficients[-1]
    assert 0 < small < 1e-3 * config.lr * 2.0


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e-12])
def test_float32_coefficients_learn_from_a_tiny_hypergradient_as_from_a_large_one(scale):
    """float32 coefficients, hyper-gradients that are noise around a mean: the path for h·1e-12
    is the path for h, within a thousandth of a step."""
    config = OneStep.scale_free()
    space = _space(a=(0.5, 0.0, 1.0), b=(0.3, 0.0, 0.5))
    gen = torch.Generator().manual_seed(2)
    hs = [torch.tensor([0.3, -0.3]) + torch.randn(2, generator=gen) for _ in range(60)]
    large, tiny = _record(config, space, torch.float32), _record(config, space, torch.float32)
    for h in hs:
        large = hyper_update.step(config, large, h)
        tiny = hyper_update.step(config, tiny, h * scale)
    torch.testing.assert_close(tiny.coefficients, large.coefficients, rtol=0, atol=1e-3 * config.lr)
    moved = (tiny.coefficients - torch.tensor([0.5, 0.3])).double() / torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert moved[0] < -5 * config.lr and moved[1] > 5 * config.lr, moved  # each against its mean h
    assert tiny.skipped.item() == 0


@pytest.mark.parametrize("h", [1e-20, 1e-25, 1e-40])
def test_float32_hypergradients_whose_square_underflows_move_less_never_more(h):
    """Below float32's normal range for h² the sign step fades (h/ε) instead of jumping: no move
    exceeds lr·(high - low), and none goes the wrong way."""
    config = OneStep.scale_free()
    space = _space(a=(0.5, 0.0, 1.0), b=(0.3, 0.0, 0.5))
    state = _record(config, space, torch.float32)
    step = config.lr * torch.tensor([1.0, 0.5], dtype=torch.float64)
    for _ in range(50):
        new = hyper_update.step(config, state, torch.tensor([h, -h], dtype=torch.float32))
        move = (new.coefficients - state.coefficients).double()
        assert (move.abs() <= step * (1 + 1e-6)).all(), move
        assert move[0] <= 0 <= move[1]
        state = new
    assert state.skipped.item() == 0


def test_per_group_rows_are_each_rows_own_step():
    """A per-group record's rows, with hyper-gradients 1e12 apart, each take the step a shared
    record takes on that row's hyper-gradient; ``low``/``high``/``lr`` are shared."""
    config = OneStep.scale_free(max_move=0.002)
    space = _space(a=(0.5, 0.0, 1.0), b=(2.0, 0.0, 10.0))
    shared = _record(config, space)
    rows = shared.with_rows(3)
    singles = [shared] * 3
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([[1e-9], [1.0], [1e3]], dtype=torch.float64)
    for _ in range(20):
        h = torch.randn(3, 2, generator=gen, dtype=torch.float64) * scales
        rows = hyper_update.step(config, rows, h)
        singles = [hyper_update.step(config, s, h[g]) for g, s in enumerate(singles)]
    for g, single in enumerate(singles):
        torch.testing.assert_close(rows.coefficients[g], single.coefficients, rtol=1e-14, atol=0)
    assert not torch.equal(rows.coefficients[0], shared.coefficients)


def test_a_scale_free_step_reads_nothing_back_to_the_host():
    config = OneStep.scale_free()
    space = _space(a=(0.5, 0.0, 1.0), b=(2.0, 0.0, 10.0))
    state = _record(config, space).with_rows(2)
    h = torch.tensor([[1e-9, 3.0], [float("inf"), 1.0]], dtype=torch.float64)
    active = torch.tensor(True)
    with host_reads_forbidden():
        hyper_update.step(config, state, h)
        hyper_update.step(config, state, h, active=active, record=active)


def test_every_path_takes_the_same_scale_free_steps():
    """The box-relative lr and the bound act in the one hyper-step every path calls: MADA under
    ``OneStep.scale_free()`` learns the same coefficients on the generic, fused and native paths."""
    from _util import batches, tiny_mlp, train

    learned = {}
    for path in ("generic", "fused", "native"):
        model = tiny_mlp(0, torch.float32)
        family = MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9)
        opt = MetaOptimizer(model.parameters(), family, hypergrad=OneStep.scale_free(), lr=1e-2, path=path)
        if opt.path != path:  # no C compiler here: the native path is not built
            continue
        train(model, opt, batches(8, dtype=torch.float32))
        learned[path] = torch.stack(list(opt.coefficients.values()))
    start = torch.tensor([0.9, 0.999, 0.1, 0.9, 0.9])
    assert not torch.equal(learned["generic"], start)
    for path, values in learned.items():
        torch.testing.assert_close(values, learned["generic"], rtol=0, atol=1e-6, msg=path)


def test_the_default_resumes_bit_identically():
    import copy

    x, y = _problem(5)
    w = torch.zeros(8, 1, requires_grad=True)
    opt = MetaOptimizer([w], TwoScales(), lr=0.05)
    _train(opt, w, x, y, 5)
    w2 = w.detach().clone().requires_grad_()
    opt2 = MetaOptimizer([w2], TwoScales(), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    rows, rows2 = _train(opt, w, x, y, 10), _train(opt2, w2, x, y, 10)
    assert torch.equal(rows, rows2) and torch.equal(w, w2)
    assert not torch.equal(rows[-1], rows[0])
