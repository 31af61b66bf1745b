"""What the compiled path costs: a family's own update, tangents derived automatically, compiled.

    python benchmarks/compiled_cost.py                      # step and cold sections, CPU
    python benchmarks/compiled_cost.py --only step --json out.json

Sections (contenders interleaved, medians over repeats, ratios next to absolute times):
  step   the optimizer step alone on the nanoGPT char model's shapes (10.7M parameters),
         gradients given, one-step hyper-gradients on: Adam(fused=True) as the baseline; MADA
         on its default CPU path (the native kernel), on its hand-derived compiled rule
         (path="fused", compile=True) and on the automatic compiled path (path="compiled": its
         update, tangents by forward mode); Padam and SGD-HD, which have only update, generic
         (eager) and compiled; MADA automatic and Padam compiled with fixed coefficients (the
         compiled rule alone: no tangents, no dot products)
  cold   the first step of a fresh process with cold inductor and metaopt caches: compilation
         included (the target is 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from mada_cost import in_fresh_processes, interleaved, table  # noqa: E402

from metaopt import MetaOptimizer, OneStep  # noqa: E402
from metaopt.plugins.hd import SGDHD  # noqa: E402
from metaopt.plugins.mada import MADA  # noqa: E402
from metaopt.plugins.padam import Padam  # noqa: E402

warnings.filterwarnings("ignore")


def make(kind: str, params):
    """(optimizer, the path it must run) for a contender."""
    return {
        "Adam(fused)": (lambda: torch.optim.Adam(params, lr=1e-3, fused=True), None),
        "MADA native (default)": (lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=1e-3), "native"),
        "MADA hand-derived compiled": (lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=1e-3,
                                                             path="fused", compile=True), "fused"),
        "MADA compiled (automatic)": (lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=1e-3,
                                                            path="compiled"), "compiled"),
        "MADA automatic, fixed": (lambda: MetaOptimizer(params, MADA(), hypergrad=None, lr=1e-3,
                                                        path="compiled"), "compiled"),
        "Padam generic": (lambda: MetaOptimizer(params, Padam(), hypergrad=OneStep(), lr=1e-3), "generic"),
        "Padam compiled, fixed": (lambda: MetaOptimizer(params, Padam(), hypergrad=None, lr=1e-3,
                                                        compile=True), "compiled"),
        "Padam compiled (automatic)": (lambda: MetaOptimizer(params, Padam(), hypergrad=OneStep(), lr=1e-3,
                                                             compile=True), "compiled"),
        "SGD-HD compiled (automatic)": (lambda: MetaOptimizer(params, SGDHD(), hypergrad=SGDHD.paper_hypergrad(),
                                                              compile=True), "compiled"),
    }[kind]


STEP_CONTENDERS = ["Adam(fused)", "MADA native (default)", "MADA hand-derived compiled", "MADA compiled (automatic)",
                   "MADA automatic, fixed", "Padam generic", "Padam compiled (automatic)", "Padam compiled, fixed",
                   "SGD-HD compiled (automatic)"]


def build(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    params = list(model.parameters())
    factory, path = make(kind, params)
    opt = factory()
    if path is not None and opt.path != path:
        raise SystemExit(f"{kind}: runs path {opt.path!r}, not {path!r} ({opt.path_reason})")
    return params, opt


def section_step(args) -> list[dict]:
    runners = {kind: build(kind) for kind in STEP_CONTENDERS}
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in runners["Adam(fused)"][0]]

    def stepper(params, opt):
        def step():
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return step

    med = interleaved({k: stepper(*r) for k, r in runners.items()}, args.repeats, warmup=3)
    for kind, (_, opt) in runners.items():
        if getattr(getattr(opt, "_path", None), "compile", False) and not opt._path.compiled:
            raise SystemExit(f"{kind}: compilation failed, it ran eagerly")
    n = sum(p.numel() for p in runners["Adam(fused)"][0])
    return table(f"optimizer step alone, nanoGPT char model ({n / 1e6:.1f}M params)", med, "Adam(fused)")


def _cold_child(kind, queue):
    cache = tempfile.mkdtemp(prefix="inductor-cold-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["METAOPT_CACHE_DIR"] = cache
    params, opt = build(kind)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    queue.put({"contender": kind, "first_step_s": times[0], "second_step_s": times[1], "third_step_s": times[2]})


def section_cold(args) -> list[dict]:
    rows = in_fresh_processes(_cold_child, ["MADA hand-derived compiled", "MADA compiled (automatic)",
                                            "Padam compiled (automatic)"])
    print("\ncold start (fresh process, cold inductor cache): the first steps, compilation included")
    print(f"{'contender':<30}{'step 1 s':>10}{'step 2 s':>10}{'step 3 s':>10}")
    for r in rows:
        print(f"{r['contender']:<30}{r['first_step_s']:>10.2f}{r['second_step_s']:>10.2f}{r['third_step_s']:>10.3f}")
    return rows


SECTIONS = {"step": section_step, "cold": section_cold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="step,cold", help="comma-separated sections: step, cold")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    results = {name: SECTIONS[name](args) for name in args.only.split(",")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "compiled_cost", "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
