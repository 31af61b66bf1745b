"""Smoke tests of examples/define_a_family.py and examples/reddi_counterexample.py (short runs)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # define_a_family.main() sets one thread
    yield
    torch.set_num_threads(n)


def load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- define_a_family --------------------------------------------------------------------------
def test_define_a_family_runs_and_learns(capsys):
    example = load("define_a_family")
    out = example.main(["--steps", "60"])
    printed = capsys.readouterr().out
    assert "learning λ" in printed and "fixed adam" in printed
    assert out["start"]["lam"] == 0.0
    assert out["learned"]["lam"] > 0.1  # moved off the SGD-with-momentum end
    assert out["learned"]["beta1"] == 0.9  # fixed coefficient untouched
    assert out["loss_after"] < out["loss_before"]


def test_define_a_family_adam_point_is_adam():
    """The family's λ = 1 point, coefficients fixed, is torch.optim.Adam (float64, 50 steps)."""
    from metaopt import MetaOptimizer

    torch.set_num_threads(1)  # a tiny problem; restored by the fixture
    example = load("define_a_family")
    x, y = (t.double() for t in example.problem())
    w1 = torch.zeros(x.shape[1], 1, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    ours = MetaOptimizer([w1], example.SGDToAdam().at("adam"), hypergrad=None, lr=0.05)
    ref = torch.optim.Adam([w2], lr=0.05)
    for _ in range(50):
        for w, opt in ((w1, ours), (w2, ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(x @ w, y).backward()
            opt.step()
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-9)


# -- reddi_counterexample ---------------------------------------------------------------------
STEPS = 3000


@pytest.fixture(scope="module")
def reddi(tmp_path_factory):
    example = load("reddi_counterexample")
    png = tmp_path_factory.mktemp("reddi") / "reddi.png"
    results = example.main(["--steps", str(STEPS), "--out", str(png)])
    return {r["name"]: r for r in results}, png


def direct_adam(steps, amsgrad=False, x0=0.0, lr=1e-3, b1=0.9, b2=0.99, eps=1e-8):
    """Adam / AMSGrad on the projected online problem, in plain float64 Python."""
    x, m, v, vmax, xs = x0, 0.0, 0.0, 0.0, [x0]
    for t in range(1, steps + 1):
        g = 1010.0 if t % 101 == 1 else -10.0
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = max(vmax, v)
        denom = math.sqrt((vmax if amsgrad else v) / (1 - b2**t)) + eps
        x = min(1.0, max(-1.0, x - lr * (m / (1 - b1**t)) / denom))
        xs.append(x)
    return xs


def test_reddi_writes_a_png(reddi):
    _, png = reddi
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("name,amsgrad", [("Adam", False), ("AMSGrad", True)])
def test_reddi_torch_contenders_match_direct_implementation(reddi, name, amsgrad):
    results, _ = reddi
    r = results[name]
    ref = direct_adam(STEPS, amsgrad=amsgrad)
    steps = r["steps"].tolist()
    assert steps[-1] == STEPS
    got = r["x"].tolist()
    assert max(abs(got[i] - ref[s]) for i, s in enumerate(steps)) <= 1e-6
    assert abs(r["final_x"] - ref[-1]) <= 1e-6


def test_reddi_mada_learns_rho_down(reddi):
    results, _ = reddi
    mada = results["MADA"]
    rho = mada["coefs"]["rho"]
    assert rho[0].item() == 1.0  # starts at the Adam point
    assert mada["final_coefficients"]["rho"] < 0.9  # and leaves it downwards
    assert mada["coefs"]["beta3"][0].item() == 0.0 and mada["coefs"]["c"][0].item() == 1.0
    # Adam's iterate is still climbing towards +1 at this point; MADA's sits below it
    assert mada["final_x"] < results["Adam"]["final_x"]
