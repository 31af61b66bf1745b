"""What MADA costs next to fused Adam on a CUDA GPU: step, training iteration, syncs, compile time.

    python benchmarks/gpu_bench.py --json out.json          # needs a CUDA device
    python benchmarks/gpu_bench.py --quick                  # fewer repeats (a smoke run)

Sections (contenders interleaved, medians of CUDA-synchronised wall times, ratios from the
same run):
  char-step   optimizer step alone, nanoGPT's Shakespeare-char model (10.7M parameters)
  char-iter   forward + backward (bf16 autocast) + step of that model, nanoGPT's own batch
              (64 x 256 tokens)
  gpt2-step   optimizer step alone on GPT-2-small shapes (12 layers, 12 heads, n_embd 768,
              vocab 50304, block 1024: 124M parameters)

Contenders: ``torch.optim.Adam(fused=True)``; MADA with one-step hyper-gradients and
``compile=True`` (its hand-derived rule, one graph per step); MADA on the automatic compiled
path (``path="compiled"``: its own update, tangents derived); Padam, a family with only
``update``, under ``compile=True`` (compiled automatically). For each metaopt contender the
run also counts host syncs in ``step()`` (``torch.cuda.set_sync_debug_mode("error")``: 0, or
the error) and times its first step (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402

from metaopt import MetaOptimizer, OneStep  # noqa: E402
from metaopt.plugins.mada import MADA  # noqa: E402
from metaopt.plugins.padam import Padam  # noqa: E402

warnings.filterwarnings("ignore")
CONTENDERS = {
    "Adam(fused)": (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), None),
    "MADA compiled": (lambda ps: MetaOptimizer(ps, MADA(), hypergrad=OneStep(), lr=1e-3, compile=True), "fused"),
    "MADA automatic": (lambda ps: MetaOptimizer(ps, MADA(), hypergrad=OneStep(), lr=1e-3, path="compiled"), "compiled"),
    "Padam automatic": (lambda ps: MetaOptimizer(ps, Padam(), hypergrad=OneStep(), lr=1e-3, compile=True), "compiled"),
}
GPT2 = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def synced(fn):
    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    return run


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    times = {n: [] for n in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = fn()
            if i >= warmup:
                times[name].append(t)
    return {n: statistics.median(t) for n, t in times.items()}


def count_syncs(opt) -> str | int:
    """0 where a step makes no host sync, else the error the sync debug mode raised."""
    if not isinstance(opt, MetaOptimizer):
        return "n/a"
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        return 0
    except RuntimeError as err:
        return f"sync: {err}"[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def build(cfg: GPTConfig, kinds):
    """Per contender: (model, optimizer, first-step seconds), each its own model from seed 0."""
    out = {}
    for kind in kinds:
        factory, path = CONTENDERS[kind]
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = factory(list(model.parameters()))
        if path is not None and opt.path != path:
            raise SystemExit(f"{kind}: runs path {opt.path!r}, not {path!r} ({opt.path_reason})")
        out[kind] = [model, opt, None]
    return out


def give_grads(model, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device="cuda") * 1e-3


def section_step(cfg, label, kinds, repeats) -> dict:
    runners = build(cfg, kinds)
    for kind, r in runners.items():
        model, opt, _ = r
        give_grads(model)
        r[2] = synced(opt.step)()  # the first step: compilation included
        if getattr(getattr(opt, "_path", None), "compile", False) and not opt._path.compiled:
            raise SystemExit(f"{kind}: compilation failed, it ran eagerly")

    med = interleaved({k: synced(r[1].step) for k, r in runners.items()}, repeats, warmup=3)
    n = sum(p.numel() for p in runners[kinds[0]][0].parameters())
    return report(f"{label}: optimizer step alone ({n / 1e6:.1f}M params)", med, runners)


def section_iteration(cfg, label, kinds, repeats, batch=64, block=256) -> dict:
    runners = build(cfg, kinds)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(cfg.vocab_size, (batch, block), generator=gen, device="cuda")
    y = torch.randint(cfg.vocab_size, (batch, block), generator=gen, device="cuda")

    def iteration(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
        return run

    for r in runners.values():
        t0 = time.perf_counter()
        iteration(r[0], r[1])()
        torch.cuda.synchronize()
        r[2] = time.perf_counter() - t0
    med = interleaved({k: synced(iteration(r[0], r[1])) for k, r in runners.items()}, repeats, warmup=3)
    for r in runners.values():  # a backward first, so that step() has gradients to sync on
        r[1].zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r[0](x, y)[1].backward()
    return report(f"{label}: training iteration, batch {batch} x {block}, bf16 autocast", med, runners)


def report(title, med, runners) -> dict:
    base = med["Adam(fused)"]
    print(f"\n{title}")
    print(f"{'contender':<20}{'ms':>10}{'x Adam(fused)':>16}{'first step s':>14}  syncs")
    rows = []
    for kind, m in med.items():
        model, opt, first = runners[kind]
        syncs = count_syncs(opt)
        rows.append({"contender": kind, "median_ms": m * 1e3, "ratio_to_Adam(fused)": m / base,
                     "first_step_s": first, "syncs_in_step": syncs,
                     "path": getattr(opt, "path", "torch")})
        print(f"{kind:<20}{m * 1e3:>10.3f}{m / base:>16.2f}{first:>14.2f}  {syncs}")
    return {"title": title, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="char-step,char-iter,gpt2-step")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 repeats")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")
    repeats = 5 if args.quick else args.repeats
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability())}
    print(info)
    kinds = list(CONTENDERS)
    sections = {
        "char-step": lambda: section_step(GPTConfig(), "nanoGPT char", kinds, repeats),
        "char-iter": lambda: section_iteration(GPTConfig(), "nanoGPT char", kinds, repeats),
        "gpt2-step": lambda: section_step(GPT2, "GPT-2 small", kinds, repeats),
    }
    results = {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = sections[name]()
        except Exception as err:  # noqa: BLE001 - report and go on to the next section
            results[name] = {"error": repr(err)[:2000]}
            print(f"{name}: {err!r}")
        results[name]["wall_s"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        if args.json:  # after each section, so a killed run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"benchmark": "gpu_bench", **info, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
