"""How far each step is from its memory floor (issue 22): streams moved, GB/s, and where the time goes.

    python benchmarks/memory_floor.py                                  # every section, 2 threads
    python benchmarks/memory_floor.py --only step --threads 2,1 --rounds 5 --json out.json
    python benchmarks/memory_floor.py --small --rounds 1 --steps 3     # a quick end-to-end check

An optimizer step over N fp32 elements is bound from below by the bytes it must move. A step
with S state buffers and fixed coefficients reads g, p and S and writes p and S: 3 + 2S streams
of N·4 bytes (fused Adam, S = 2: 7). With K learned coefficients and one-step hyper-gradients it
first reads g and the K tangents to form the hyper-gradient h (the hyper-step must finish, a sum
over every parameter, before the rule can use the new coefficients), then reads g, p and S and
writes p, S and the K new tangents: 4 + 2S + 2K streams. S and K are read off each optimizer
after a step (its full-size state tensors that are neither the step count nor tangents, and
``len(opt.learned)``), not assumed. The bandwidth those streams are measured against is a plain
``copy_`` of an N-element fp32 buffer into another (2 streams) timed in the same process, so the
floor (streams × N × 4 bytes / copy bandwidth) is a measurement of this machine at that moment.

Sections (each contender in its own fresh process, fused Adam timed beside it in that process;
the contenders' processes alternate across rounds, each round starting with the next contender;
medians over steps, then over rounds):
  step     the optimizer step alone on nanoGPT's Shakespeare-char model (6 layers, 6 heads,
           n_embd 384, vocab 65, block 256: 10.7M parameters in 76 tensors), fp32, fixed random
           gradients; per --threads value. Printed: step ms, x Adam(fused), streams, GB/s, x the
           copy's GB/s, and x the step's own floor.
  profile  torch.profiler over --profile-steps steps of each metaopt contender: ms per step in
           the rule (inductor's kernels / the native C kernel), in gathering and scattering
           (aten::cat, copy_, _foreach_copy_, _foreach_add_, add_ on full-size tensors), in the
           hyper-gradient's dot products (aten::dot/vdot/mm/mv; the native kernel's own dot
           pass), and the rest (Python, the hyper-step's small ops, the profiler's own cost)
  train    a training iteration of the same model (forward, backward, step, zero_grad), batch
           4 x 64 tokens, each contender against fused Adam in its own process
  one      a one-element parameter on the online problem of Reddi et al.
           (examples/reddi_counterexample.py: forward, backward, step, clamp, zero_grad): MADA
           against torch.optim.Adam, the fixed cost of an iteration
  cold     the first steps of a fresh process with an empty inductor (and metaopt kernel) cache,
           then of a second fresh process with that cache filled: seconds

Contenders: torch.optim.Adam(fused=True); MADA on its default path (the native C kernel on a
CPU), with path="fused", compile=True (hand-derived rule, one inductor graph) and with
path="compiled" (its update, tangents derived); Padam, compile=True (only update); an
Adam<->AdaBelief family with only init and update (benchmarks/belief_family.py), compile=True;
SGD-HD, compile=True. Each learns its coefficients with its own default hyper-optimizer (one-step
hyper-gradients: MetaOptimizer's hypergrad="default").

Only the public API is used (MetaOptimizer, opt.path, opt.path_reason, opt.learned, opt.state), so
the script runs unchanged on later versions of the engine. Timings on a shared machine swing:
read the ratios, which come from one process.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue as queue_lib
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from belief_family import AdamBelief, MADAUpdateOnly  # noqa: E402
from compare_commits import cpu  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from mada_cost import Reddi, interleaved  # noqa: E402

from metaopt import MetaOptimizer, OneStep  # noqa: E402
from metaopt.plugins.hd import SGDHD  # noqa: E402
from metaopt.plugins.mada import MADA  # noqa: E402
from metaopt.plugins.padam import Padam  # noqa: E402

BASE = "Adam(fused)"
LR = 1e-3

# name -> (factory(params), the path it is meant to run; None: a torch optimizer). A contender
# that runs another path still runs (a later engine may choose differently); its row says so.
CONTENDERS = {
    BASE: (lambda ps: torch.optim.Adam(ps, lr=LR, fused=True), None),
    "MADA default": (lambda ps: MetaOptimizer(ps, MADA(), lr=LR), "native"),
    "MADA fused compile": (lambda ps: MetaOptimizer(ps, MADA(), lr=LR, path="fused", compile=True), "fused"),
    "MADA compiled": (lambda ps: MetaOptimizer(ps, MADA(), lr=LR, path="compiled"), "compiled"),
    "MADA update C": (lambda ps: MetaOptimizer(ps, MADAUpdateOnly(), lr=LR, compile=True), "native"),
    # no mada.c for these configurations: the hand-derived rule compiled, or a kernel written from update
    "MADA lion fused": (lambda ps: MetaOptimizer(ps, MADA(lion=True), lr=LR, path="fused", compile=True), "fused"),
    "MADA lion C": (lambda ps: MetaOptimizer(ps, MADA(lion=True), lr=LR, path="native"), "native"),
    "MADA official fused": (lambda ps: MetaOptimizer(ps, MADA(preset="official"), lr=LR, path="fused", compile=True),
                            "fused"),
    "MADA official C": (lambda ps: MetaOptimizer(ps, MADA(preset="official"), lr=LR, path="native"), "native"),
    "Padam compile": (lambda ps: MetaOptimizer(ps, Padam(), lr=LR, compile=True), "native"),
    "Padam compiled": (lambda ps: MetaOptimizer(ps, Padam(), lr=LR, path="compiled"), "compiled"),
    "Belief compile": (lambda ps: MetaOptimizer(ps, AdamBelief(), lr=LR, compile=True), "native"),
    "Belief compiled": (lambda ps: MetaOptimizer(ps, AdamBelief(), lr=LR, path="compiled"), "compiled"),
    # SGD-HD's lr is a multiplier on the learned rate alpha (default 1e-3): leave it at 1
    "SGD-HD compile": (lambda ps: MetaOptimizer(ps, SGDHD(), compile=True), "native"),
}
METAOPT = [k for k in CONTENDERS if k != BASE]


def chosen(args) -> list[str]:
    """The contenders --contenders names (all by default), fused Adam always among them."""
    if not args.contenders:
        return list(CONTENDERS)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {list(CONTENDERS)}")
    return [BASE] + [n for n in names if n != BASE]
SECTIONS = ("step", "profile", "train", "one", "cold")


# -- the model and what a step must move ---------------------------------------------------
def model_config(small: bool) -> GPTConfig:
    """nanoGPT's char model (GPTConfig's defaults), or a tiny one for checking the script."""
    return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64) if small else GPTConfig()


def build(kind: str, small: bool):
    """(model, params, optimizer) for a contender; the model from the same seed every time."""
    torch.manual_seed(0)
    model = GPT(model_config(small))
    params = list(model.parameters())
    return model, params, CONTENDERS[kind][0](params)


def fixed_grads(params, seed: int = 0) -> list[torch.Tensor]:
    """Random gradients, fixed for the run, of the parameters' shapes (Adam-scale values)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]


def stepper(params, grads, opt):
    """One optimizer step on the fixed gradients.

    They are handed over once and then left where the optimizer keeps them, as a backward that
    accumulates in place leaves them: an optimizer that holds gradients in flat storage points
    ``.grad`` at its own buffer at its first step, and assigning fresh tensors every step would
    time a copy no training loop makes.
    """
    def step():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g
        opt.step()
    return step


def streams_of(opt, params) -> dict:
    """S, K and the fp32 streams a step must move, read off an optimizer that has stepped.

    S: state tensors of a parameter's full size other than the step count and the tangents (the
    engine names those ``hypergrad_tangent...``); K: the learned coefficients. One-step learning
    (K > 0) moves 4 + 2S + 2K streams, fixed coefficients 3 + 2S (fused Adam: S = 2, 7 streams).
    """
    s = tangents = 0
    for p in params:
        st = opt.state.get(p, {})
        full = {k: v for k, v in st.items() if torch.is_tensor(v) and v.numel() == p.numel() and k != "step"}
        s = max(s, sum(1 for k in full if not str(k).startswith("hypergrad_tangent")))
        tangents = max(tangents, sum(1 for k in full if str(k).startswith("hypergrad_tangent")))
    k = len(getattr(opt, "learned", ()))
    return {"S": s, "K": k, "tangent_buffers": tangents, "streams": 4 + 2 * s + 2 * k if k else 3 + 2 * s}


def path_of(opt) -> str:
    return getattr(opt, "path", "torch")


# -- fresh processes -----------------------------------------------------------------------
def _guarded(child, job, queue) -> None:
    """Run ``child(job)`` and put its result, or the exception it raised, on the queue; the
    warnings it gave (a compilation that fell back to eager says so in one) go with it."""
    try:
        torch.set_num_threads(job.get("threads", 2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = child(job)
        seen = []
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                continue  # torch's own deprecations, the same in every process
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
            if text not in seen:
                seen.append(text)
        row["warnings"] = seen
    except BaseException as err:  # noqa: BLE001 - the parent reports it and goes on with the others
        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    queue.put(row)


def fresh_process(child, job: dict, timeout: float) -> dict:
    """``child(job)`` in a fresh (spawned) interpreter. Like mada_cost.in_fresh_processes, but a
    contender that raises, crashes or hangs is reported and the run goes on."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_guarded, args=(child, job, q))
    p.start()
    deadline = time.monotonic() + timeout
    row = None
    while row is None:
        try:
            row = q.get(timeout=1.0)
        except queue_lib.Empty:
            if not p.is_alive():
                row = {"error": f"the process died (exit code {p.exitcode})"}
            elif time.monotonic() > deadline:
                p.kill()
                row = {"error": f"timed out after {timeout:.0f} s"}
    p.join()
    row.setdefault("contender", job["kind"])
    if "error" in row:
        print(f"  {job['kind']}: FAILED: {row['error']}", file=sys.stderr)
        if "traceback" in row:
            print(row["traceback"], file=sys.stderr)
    return row


def rounds_of(child, kinds: list[str], args, **extra) -> dict[str, list[dict]]:
    """Every kind in its own fresh process, ``args.rounds`` times, each round starting with the
    next kind, so that the machine's drift falls on every contender alike."""
    runs = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            job = {"kind": kind, "steps": args.steps, "small": args.small, "threads": args.threads[0]} | extra
            runs[kind].append(fresh_process(child, job, args.timeout))
            print(f"  round {r + 1}/{args.rounds}: {kind} done", file=sys.stderr)
    return runs


def median_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if "error" not in r and r.get(key) is not None]
    return statistics.median(vals) if vals else math.nan


def first_ok(rows: list[dict]) -> dict:
    return next((r for r in rows if "error" not in r), rows[0] if rows else {})


# -- step ----------------------------------------------------------------------------------
def _step_child(job: dict) -> dict:
    kind, small = job["kind"], job["small"]
    _, pa, adam = build(BASE, small)
    _, pc, opt = build(kind, small)
    grads = fixed_grads(pc)
    n = sum(p.numel() for p in pc)
    src, dst = torch.randn(n), torch.empty(n)
    fns = {"copy": lambda: dst.copy_(src), "adam": stepper(pa, grads, adam), "contender": stepper(pc, grads, opt)}
    fns["contender"]()  # the first step makes the state (and compiles): read S and K after it
    counts = streams_of(opt, pc)
    med = interleaved(fns, job["steps"], warmup=3)
    bw = 2 * n * 4 / med["copy"]
    step_bytes = counts["streams"] * n * 4
    return {"contender": kind, "path": path_of(opt), "path_reason": getattr(opt, "path_reason", ""),
            "threads": torch.get_num_threads(), "params": n, "tensors": len(pc), **counts,
            "step_s": med["contender"], "adam_s": med["adam"], "copy_s": med["copy"], "copy_GBps": bw / 1e9,
            "ratio_to_adam": med["contender"] / med["adam"], "GBps": step_bytes / med["contender"] / 1e9,
            "ratio_to_copy_bw": step_bytes / med["contender"] / bw, "floor_s": step_bytes / bw,
            "ratio_to_floor": med["contender"] / (step_bytes / bw)}


def section_step(args) -> list[dict]:
    out = []
    for threads in args.threads:
        runs = rounds_of(_step_child, chosen(args), args, threads=threads)
        first = first_ok(runs[BASE])
        n, tensors = first.get("params", 0), first.get("tensors", 0)
        print(f"\noptimizer step alone, {threads} thread(s), {n / 1e6:.2f}M fp32 parameters in {tensors} tensors; "
              f"medians over {args.steps} steps and {args.rounds} round(s), one fresh process per contender")
        print("(streams: fp32 passes over N the step must make; x Adam(f): against fused Adam timed in the same "
              "process; x own: against the Adam(fused) row, fused Adam in a process of its own (no compiled graph "
              "beside it); GB/s: streams x N x 4 B / step time; x copy: that over a copy_'s GB/s in the same "
              "process; x floor: step time over streams x N x 4 B / copy GB/s)")
        print(f"{'contender':<20}{'path':>10}{'S':>3}{'K':>3}{'streams':>8}{'ms':>9}{'x Adam(f)':>10}{'x own':>7}"
              f"{'GB/s':>7}{'copy GB/s':>10}{'x copy':>7}{'floor ms':>9}{'x floor':>8}")
        base_ok = [r for r in runs[BASE] if "error" not in r]
        base_s = median_of(base_ok, "step_s") if base_ok else float("nan")
        for kind, rows in runs.items():
            row = {"contender": kind, "threads": threads, "rounds": rows}
            ok = [r for r in rows if "error" not in r]
            if not ok:
                print(f"{kind:<20}  failed: {rows[0].get('error', '?')[:90]}")
                out.append(row)
                continue
            f = ok[0]
            for key in ("step_s", "adam_s", "copy_GBps", "ratio_to_adam", "GBps", "ratio_to_copy_bw", "floor_s",
                        "ratio_to_floor"):
                row[key] = median_of(ok, key)
            row |= {k: f[k] for k in ("path", "path_reason", "S", "K", "tangent_buffers", "streams", "params")}
            row["ratio_to_adam_own_process"] = row["step_s"] / base_s
            print(f"{kind:<20}{f['path']:>10}{f['S']:>3}{f['K']:>3}{f['streams']:>8}{row['step_s'] * 1e3:>9.2f}"
                  f"{row['ratio_to_adam']:>10.2f}{row['ratio_to_adam_own_process']:>7.2f}{row['GBps']:>7.1f}{row['copy_GBps']:>10.1f}"
                  f"{row['ratio_to_copy_bw']:>7.2f}{row['floor_s'] * 1e3:>9.2f}{row['ratio_to_floor']:>8.2f}")
            expected = CONTENDERS[kind][1]
            if expected and f["path"] != expected:
                print(f"{'':<20}  ran path {f['path']!r}, not {expected!r}: {f['path_reason']}")
            for w in f.get("warnings", []):
                print(f"{'':<20}  warning: {w}")
            out.append(row)
    return out


# -- profile -------------------------------------------------------------------------------
LABEL = "memory_floor.step"
GATHER = {"aten::cat", "aten::copy_", "aten::_foreach_copy_", "aten::_foreach_add_", "aten::add_",
          "aten::_foreach_add", "aten::index_copy_", "aten::narrow_copy"}
DOTS = {"aten::dot", "aten::vdot", "aten::mm", "aten::mv", "aten::bmm"}


def _numel(shapes) -> int:
    """Elements of an op's first input, from the profiler's record_shapes (1 when unknown)."""
    try:
        first = shapes[0]
        if first and isinstance(first[0], (list, tuple)):  # a list of tensors (foreach ops, cat)
            return sum(math.prod(s) for s in first)
        return math.prod(first) if first else 1
    except (IndexError, TypeError):
        return 1


def categorize(event, full: int) -> str:
    """Which row of the breakdown an event's self time belongs to.

    - rule: inductor's CPU kernels (the python tracer names each call of a compiled kernel
      ``<built-in function kernel>``; with kernel profiling on, ``cpp_fused...``), and the native
      C kernel. That one is called through ctypes, which the tracer does not see: its time is
      the self time of the engine's Python frame that calls it, in a file named native or
      kernels (calls of 200 µs or more: C, not Python bookkeeping); the frame that forms the
      hyper-gradient there (its name says dot or hypergrad) is the kernel's dot-product pass.
    - gather/scatter: the copies of gradients into flat buffers and of updates back into the
      parameters, counted only on full-size tensors (the hyper-step's 0-d adds are not).
    - dots: the hyper-gradient's dot products as BLAS calls.
    """
    name = event.name
    if name == "<built-in function kernel>" or "cpp_fused" in name or name.startswith("triton_"):
        return "rule"
    if name in DOTS:
        return "dots"
    if name in GATHER:
        return "gather" if _numel(getattr(event, "input_shapes", None) or []) >= min(full, 1024) else "rest"
    if ".py(" in name and ("metaopt" in name or "plugins" in name):
        file, func = name.split("(", 1)[0], name.rsplit(": ", 1)[-1].lower()
        if ("native" in file or "kernel" in file) and event.self_cpu_time_total >= 200:  # µs in one call: C, not Python
            return "dots" if ("dot" in func or "hypergrad" in func) else "rule"
    return "rest"


def _profile_child(job: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    kind = job["kind"]
    _, params, opt = build(kind, job["small"])
    grads = fixed_grads(params)
    step = stepper(params, grads, opt)
    for _ in range(3):  # compile and warm up outside the profile
        step()
    n = sum(p.numel() for p in params)
    steps = job["profile_steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    plain = (time.perf_counter() - t0) / steps
    # with_stack: the python tracer, without which neither inductor's kernels nor the ctypes call
    # of the native kernel show up; record_shapes: to tell the parameters' adds from 0-d ones
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
        for _ in range(steps):
            with record_function(LABEL):
                step()
    events = list(prof.events())
    marks = [e for e in events if e.name == LABEL]
    main = {e.thread for e in marks}
    windows = [(e.time_range.start, e.time_range.end) for e in marks]
    total = sum(end - start for start, end in windows)
    rows = {"rule": 0.0, "gather": 0.0, "dots": 0.0}
    by_name: dict[str, float] = {}
    for e in events:
        if e.thread not in main or e.name == LABEL:
            continue
        start = e.time_range.start
        if not any(a <= start < b for a, b in windows):
            continue
        cat = categorize(e, n)
        if cat in rows:
            rows[cat] += e.self_cpu_time_total
        key = f"[{cat}] {e.name[:80]}"
        by_name[key] = by_name.get(key, 0.0) + e.self_cpu_time_total
    rows["rest"] = total - sum(rows.values())
    per_step = {k: v / steps / 1e3 for k, v in rows.items()}  # µs -> ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]  # the main thread's, inside the steps
    return {"contender": kind, "path": path_of(opt), "steps": steps, "profiled_step_ms": total / steps / 1e3,
            "unprofiled_step_ms": plain * 1e3, **{f"{k}_ms": v for k, v in per_step.items()},
            "top_self": [(name, us / steps / 1e3) for name, us in top]}


def section_profile(args) -> list[dict]:
    rows = []
    for kind in [k for k in chosen(args) if k != BASE]:
        job = {"kind": kind, "small": args.small, "threads": args.threads[0], "profile_steps": args.profile_steps}
        rows.append(fresh_process(_profile_child, job, args.timeout))
    print(f"\nwhere a step's time goes (torch.profiler, {args.profile_steps} steps, {args.threads[0]} thread(s)); "
          "ms per step")
    print("(rule: inductor kernels / native C kernel; gather/scatter: cat, copy_, _foreach_copy_/_add_, add_ on "
          "full-size tensors; dots: dot/mm/mv or the native dot pass; rest: Python, small ops, profiler)")
    print(f"{'contender':<20}{'path':>10}{'unprofiled':>11}{'profiled':>9}{'rule':>8}{'gather':>8}{'dots':>8}"
          f"{'rest':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['contender']:<20}  failed: {r['error'][:90]}")
            continue
        print(f"{r['contender']:<20}{r['path']:>10}{r['unprofiled_step_ms']:>11.2f}{r['profiled_step_ms']:>9.2f}"
              f"{r['rule_ms']:>8.2f}{r['gather_ms']:>8.2f}{r['dots_ms']:>8.2f}{r['rest_ms']:>8.2f}")
    if args.verbose:
        for r in rows:
            if "error" not in r:
                print(f"\n{r['contender']}: largest self times in the steps, ms per step, [row]")
                for name, ms in r["top_self"]:
                    print(f"  {ms:>8.3f}  {name}")
    return rows


# -- train ---------------------------------------------------------------------------------
def _train_child(job: dict) -> dict:
    kind, small = job["kind"], job["small"]
    runners = {"adam": build(BASE, small), "contender": build(kind, small)}
    cfg = model_config(small)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(8):
        x = torch.randint(0, cfg.vocab_size, (4, 65), generator=gen)  # batch 4 x 64 tokens
        data.append((x[:, :-1], x[:, 1:]))
    counters = {k: 0 for k in runners}

    def iteration(key):
        model, _, opt = runners[key]

        def run():
            x, y = data[counters[key] % len(data)]
            counters[key] += 1
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return run

    fns = {k: iteration(k) for k in runners}
    med = interleaved(fns, job["steps"], warmup=3)
    return {"contender": kind, "path": path_of(runners["contender"][2]), "iteration_s": med["contender"],
            "adam_s": med["adam"], "ratio_to_adam": med["contender"] / med["adam"]}


def section_train(args) -> list[dict]:
    out = []
    for threads in args.threads:
        runs = rounds_of(_train_child, chosen(args), args, threads=threads)
        print(f"\ntraining iteration (forward, backward, step, zero_grad), batch 4 x 64, {threads} thread(s); "
              f"medians over {args.steps} iterations and {args.rounds} round(s)")
        print(f"{'contender':<20}{'path':>10}{'ms':>9}{'Adam(f) ms':>11}{'x Adam(f)':>10}")
        for kind, rows in runs.items():
            ok = [r for r in rows if "error" not in r]
            row = {"contender": kind, "threads": threads, "rounds": rows}
            if not ok:
                print(f"{kind:<20}  failed: {rows[0].get('error', '?')[:90]}")
            else:
                row |= {k: median_of(ok, k) for k in ("iteration_s", "adam_s", "ratio_to_adam")}
                row["path"] = ok[0]["path"]
                print(f"{kind:<20}{row['path']:>10}{row['iteration_s'] * 1e3:>9.2f}{row['adam_s'] * 1e3:>11.2f}"
                      f"{row['ratio_to_adam']:>10.2f}")
            out.append(row)
    return out


# -- one element ---------------------------------------------------------------------------
def _one_child(job: dict) -> dict:
    # the settings of examples/reddi_counterexample.py: lr 1e-3, betas (0.9, 0.99), eps 1e-8; MADA
    # at the Adam point with the AVGrad mean, hyper-SGD lr 0.1, momentum 0.9
    betas = (0.9, 0.99)
    models = {"Adam": Reddi(), "MADA": Reddi()}
    opts = {"Adam": torch.optim.Adam(models["Adam"].parameters(), lr=LR, betas=betas, eps=1e-8),
            "MADA": MetaOptimizer(models["MADA"].parameters(), MADA(second_moment="mean", betas=betas).at("adam"),
                                  hypergrad=OneStep(lr=0.1, momentum=0.9), lr=LR, eps=1e-8)}
    big, small = torch.tensor(1010.0), torch.tensor(-10.0)
    t = {k: 0 for k in models}

    def iteration(k):
        model, opt = models[k], opts[k]

        def run():
            t[k] += 1
            opt.zero_grad()
            model(big if t[k] % 101 == 1 else small).backward()
            opt.step()
            with torch.no_grad():
                model.x.clamp_(-1.0, 1.0)
        return run

    med = interleaved({k: iteration(k) for k in models}, job["steps"] * 50, warmup=50)
    return {"contender": "MADA", "path": opts["MADA"].path, "mada_s": med["MADA"], "adam_s": med["Adam"],
            "ratio_to_adam": med["MADA"] / med["Adam"]}


def section_one(args) -> list[dict]:
    runs = rounds_of(_one_child, ["MADA"], args)["MADA"]
    ok = [r for r in runs if "error" not in r]
    print(f"\none-element iteration (Reddi et al.: forward, backward, step, clamp, zero_grad), "
          f"{args.threads[0]} thread(s); medians over {args.steps * 50} iterations and {args.rounds} round(s)")
    if not ok:
        print(f"  failed: {runs[0].get('error')}")
        return runs
    row = {k: median_of(ok, k) for k in ("mada_s", "adam_s", "ratio_to_adam")}
    print(f"{'contender':<24}{'path':>10}{'us':>10}{'x Adam':>8}")
    print(f"{'torch.optim.Adam':<24}{'torch':>10}{row['adam_s'] * 1e6:>10.1f}{1.0:>8.2f}")
    print(f"{'MADA (default path)':<24}{ok[0]['path']:>10}{row['mada_s'] * 1e6:>10.1f}{row['ratio_to_adam']:>8.2f}")
    return [row | {"path": ok[0]["path"], "rounds": runs}]


# -- cold ----------------------------------------------------------------------------------
def _cold_child(job: dict) -> dict:
    # before the first compilation or kernel build reads them (both are read when used, not at import)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = job["cache"]
    os.environ["METAOPT_CACHE_DIR"] = job["cache"]
    torch.manual_seed(0)
    model = GPT(model_config(job["small"]))
    params = list(model.parameters())
    t0 = time.perf_counter()
    opt = CONTENDERS[job["kind"]][0](params)  # the native path builds (or loads) its C kernel here
    construct = time.perf_counter() - t0
    grads = fixed_grads(params)
    times = []
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"contender": job["kind"], "path": path_of(opt), "construct_s": construct, "first_step_s": times[0],
            "second_step_s": times[1], "third_step_s": times[2]}


def section_cold(args) -> list[dict]:
    rows = []
    for kind in [k for k in chosen(args) if k != BASE]:
        cache = tempfile.mkdtemp(prefix="memory-floor-cold-")
        job = {"kind": kind, "small": args.small, "threads": args.threads[0], "cache": cache}
        cold = fresh_process(_cold_child, job, args.timeout)
        warm = fresh_process(_cold_child, job, args.timeout)
        rows.append({"contender": kind, "cache": cache, "cold": cold, "warm": warm})
    print(f"\ncold start: a fresh process with an empty inductor/metaopt cache, then a second one with it filled; "
          f"seconds, {args.threads[0]} thread(s)")
    print(f"{'contender':<20}{'path':>10}{'construct':>11}{'step 1':>8}{'step 2':>8}"
          f"{'warm: construct':>17}{'step 1':>8}{'step 2':>8}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        if "error" in c or "error" in w:
            print(f"{r['contender']:<20}  failed: {(c.get('error') or w.get('error'))[:90]}")
            continue
        print(f"{r['contender']:<20}{c['path']:>10}{c['construct_s']:>11.2f}{c['first_step_s']:>8.2f}"
              f"{c['second_step_s']:>8.3f}{w['construct_s']:>17.2f}{w['first_step_s']:>8.2f}{w['second_step_s']:>8.3f}")
    return rows


RUN = {"step": section_step, "profile": section_profile, "train": section_train, "one": section_one,
       "cold": section_cold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--contenders", default="", help="comma-separated contender names (default: all)")
    ap.add_argument("--rounds", type=int, default=5, help="fresh processes per contender (step, train, one)")
    ap.add_argument("--steps", type=int, default=20,
                    help="timed steps (iterations) per process; the one-element section runs 50x as many")
    ap.add_argument("--threads", default="2", help="torch threads, comma-separated (e.g. 2,1): step and train "
                                                   "run once per value, the other sections with the first")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="a tiny GPT (2 layers, n_embd 64): to check the script")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a contender's process is given up")
    ap.add_argument("--verbose", action="store_true", help="also print each profile's largest self times")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in RUN]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    print(f"CPU: {cpu()}")
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {args.threads}, model {'small' if args.small else 'nanoGPT char (10.7M)'}, fp32")
    results = {}
    for name in only:
        t0 = time.perf_counter()
        results[name] = RUN[name](args)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "memory_floor", "cpu": cpu(), "torch": torch.__version__,
                       "capability": torch.backends.cpu.get_cpu_capability(), "args": vars(args),
                       "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
