"""A recorded reference trajectory of the engine, to be reproduced bit for bit.

Recorded before the execution paths moved into modules of their own (issue 11), so that a
refactor which claims to change nothing numerically can be held to it: 30 steps in float64 on
every execution path (generic, fused eager, fused compiled, native) and in every hyper-gradient
mode (fixed coefficients, one-step with hyper-SGD and clipping, one-step with hyper-Adam and a
warm-up, one-step with the validation objective, unrolled), over two param groups, with a
scheduler moving the learning rate and a parameter that sits a step out. Per step it keeps the
parameters, the coefficients and the last hyper-gradient; at the end, the whole state dict.

Bits depend on the machine's kernels (vector width, BLAS code path, thread count), so the
trajectory is recorded and checked under a pinned numeric environment (:data:`PINNED`): torch's
kernels at AVX2, MKL in its reproducible mode, one thread, and the native and inductor kernels
compiled for x86-64-v3. Machines of one vendor with AVX2 and FMA give the same bits; Intel's and
AMD's differ in the last bit of a few results, so each vendor has its file (:data:`STORED_BY_VENDOR`).

    python tests/reference_trajectory.py record [CASE ...]   # rewrite the stored file
    python tests/reference_trajectory.py check  [CASE ...]   # exit 1 naming what differs

Both re-run themselves under :data:`PINNED` in a fresh interpreter. ``tests/test_reference_
trajectory.py`` runs ``check``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_vendor() -> str:
    """The CPU's vendor id (/proc/cpuinfo), "unknown" where it says none."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return "unknown"


#: the stored trajectories, one per CPU vendor: under the pinned environment an Intel Xeon
#: (AVX-512) and the AMD EPYC the first was recorded on differ in the last bit of a few float64
#: results (tangents, hyper-gradient dot products), though both have AVX2 and FMA; pinning MKL's
#: instructions (MKL_ENABLE_INSTRUCTIONS=AVX2, MKL_CBWR=AVX2) or glibc's (GLIBC_TUNABLES
#: hwcaps without AVX-512) did not remove the difference. Each vendor's file was recorded from
#: the same commit's code, so a change is held to the bits on either.
STORED_BY_VENDOR = {
    "AuthenticAMD": HERE / "data" / "reference_trajectory.pt",
    "GenuineIntel": HERE / "data" / "reference_trajectory-intel.pt",
}
STORED = STORED_BY_VENDOR.get(cpu_vendor(), STORED_BY_VENDOR["AuthenticAMD"])
STEPS = 30
#: the numeric environment the trajectory is recorded and checked in
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
    "METAOPT_NATIVE": "1",
}
MARCH = "-march=x86-64-v3"


def cases() -> dict[str, tuple[str, str]]:
    """name -> (path, mode)."""
    out = {}
    for path in ("generic", "fused", "native", "compiled"):
        modes = ("fixed", "one-step") if path == "compiled" else ("fixed", "one-step", "one-step-adam", "validation")
        for mode in modes:
            out[f"{path}-{mode}"] = (path, mode)
    out["generic-unrolled"] = ("generic", "unrolled")
    out["generic-forward-mode"] = ("generic", "forward-mode")  # a rule that is not elementwise
    return out


def _family(mode):
    import torch

    from metaopt import Coefficient, CoefficientSpace, Family
    from metaopt.plugins.mada import MADA

    if mode == "forward-mode":

        class Momentum(Family):
            """b_t = μ b_{t-1} + g_t, Δ = -η (b_t + κ g_t), not declared elementwise (jacfwd)."""

            name = "momentum"

            def __init__(self):
                self.space = CoefficientSpace(
                    mu=Coefficient(init=0.5, low=0.0, high=0.99), kappa=Coefficient(init=0.1, low=0.0, high=1.0)
                )

            def init(self, param, grad, group):
                return {"buf": torch.zeros_like(param)}

            def update(self, grad, param, state, coefficients, group, step):
                buf = coefficients["mu"] * state["buf"] + grad
                return -group["lr"] * (buf + coefficients["kappa"] * grad), {"buf": buf}

        return Momentum()
    return MADA(betas=(0.9, 0.99), learn=("beta1", "beta2", "beta3", "c", "rho")).with_coefficients(
        beta3=0.3, c=0.7, rho=0.6
    )


def _hypergrad(mode):
    from metaopt import OneStep, Unrolled

    return {
        "fixed": None,
        "one-step": OneStep(lr=0.05, momentum=0.9, clip=5.0),
        "forward-mode": OneStep(lr=0.05, momentum=0.9, clip=5.0),
        "one-step-adam": OneStep(optimizer="adam", lr=1e-3, warmup=4, clip=1.0, clip_style="norm"),
        "validation": OneStep(lr=0.05, objective="validation"),
        "unrolled": Unrolled(steps=3, lr=0.05),
    }[mode]


def trajectory(name: str) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from _util import batches, loss_fn, tiny_mlp

    from metaopt import MetaOptimizer

    path, mode = cases()[name]
    model = tiny_mlp(3)
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 3e-3},
    ]
    opt = MetaOptimizer(
        groups, _family(mode), hypergrad=_hypergrad(mode),
        path="fused" if path == "compiled" else path, compile=path == "compiled",
    )
    assert opt.path == ("fused" if path == "compiled" else path), (name, opt.path)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    data = batches(4 * STEPS + 1, seed=9)
    params, coefficients, hypergradients = [], [], []
    for t in range(STEPS):
        if mode == "unrolled":  # one round: K = 3 inner steps, then the hyper-step
            opt.unrolled_step(model, data[3 * t:3 * t + 3], loss_fn, meta_batch=data[3 * t + 3])
        else:
            opt.zero_grad()
            loss_fn(model, data[t]).backward()
            if t == STEPS // 2:
                model[2].bias.grad = None  # sits this step out: the buckets break
            opt.step()
            if mode == "validation" and t % 5 == 4:
                opt.validation_hyperstep(loss_fn(model, data[-1]))
        sched.step()
        params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        coefficients.append(torch.stack(list(opt.coefficients.values())))
        hypergradients.append(torch.stack(list(opt.last_hypergrad.values())) if opt.learned else torch.zeros(0))
    sd = opt.state_dict()
    return {
        "params": torch.stack(params),
        "coefficients": torch.stack(coefficients),
        "hypergradients": torch.stack(hypergradients),
        "state": {f"{pid}.{k}": v.clone() for pid, st in sd["state"].items() for k, v in st.items()},
        "hyper_state": {k: v.clone() for k, v in sd["param_groups"][0]["metaopt"]["hyper_state"].items()},
        "final": {"coefficients": sd["param_groups"][0]["metaopt"]["coefficients"].clone(), "last_hypergrad": sd["param_groups"][0]["metaopt"]["last_hypergrad"].clone()},
    }


def differences(got, expected, where="") -> list[str]:
    """Where ``got`` is not bit-identical to ``expected`` (dtype, shape and every bit)."""
    import torch

    if isinstance(expected, dict):
        out = [] if set(got) == set(expected) else [f"{where}: keys {sorted(got)} != {sorted(expected)}"]
        for k in expected:
            if k in got:
                out += differences(got[k], expected[k], f"{where}/{k}")
        return out
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return [f"{where}: {got.dtype}{tuple(got.shape)} != {expected.dtype}{tuple(expected.shape)}"]
    if torch.equal(got, expected):
        return []
    bad = (got != expected).nonzero()
    first = tuple(bad[0].tolist())
    return [f"{where}: {len(bad)} entries differ, first at {first}: {got[first].item()!r} != {expected[first].item()!r}"]


def _pinned_cc(directory: Path) -> str:
    """A C compiler wrapper that builds the native kernel for x86-64-v3 instead of this CPU."""
    import shutil

    real = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    wrapper = directory / "cc-x86-64-v3"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do shift; [ "$a" = -march=native ] && a=' + MARCH + '; set -- "$@" "$a"; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


def machine_fits() -> str | None:
    """Why this machine cannot reproduce the pinned bits (None: it can)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the reference is recorded for x86-64-v3; this is {platform.machine()}"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "no /proc/cpuinfo to check for AVX2 and FMA"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    if missing:
        return f"the CPU lacks {missing}, which x86-64-v3 needs"
    if cpu_vendor() not in STORED_BY_VENDOR:
        return f"no reference is recorded for {cpu_vendor()} CPUs (the last bits differ between vendors)"
    return None


def run_pinned(command: str, names: list[str]) -> subprocess.CompletedProcess:
    """``command`` (record or check) in a fresh interpreter under :data:`PINNED`."""
    with tempfile.TemporaryDirectory(prefix="metaopt-reference-") as tmp:
        env = {
            **os.environ, **PINNED, "CC": _pinned_cc(Path(tmp)), "METAOPT_CACHE_DIR": str(Path(tmp) / "cache"),
            "METAOPT_REFERENCE_PINNED": "1",
        }
        return subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), command, *names],
            env=env, capture_output=True, text=True, timeout=1200,
        )


def main(argv: list[str]) -> int:
    command, names = argv[0], argv[1:] or list(cases())
    if os.environ.get("METAOPT_REFERENCE_PINNED") != "1":
        done = run_pinned(command, names)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
    if command == "record":
        stored = torch.load(STORED, weights_only=True) if STORED.exists() else {}
        stored.update({name: trajectory(name) for name in names})
        STORED.parent.mkdir(exist_ok=True)
        torch.save(stored, STORED)
        print(f"recorded {len(names)} cases into {STORED}")
        return 0
    stored = torch.load(STORED, weights_only=True)
    failures = []
    for name in names:
        found = differences(trajectory(name), stored[name], name)
        print(f"{name}: {'bit-identical' if not found else 'DIFFERS'}")
        failures += found
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
