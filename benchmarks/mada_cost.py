"""What MADA costs next to Adam: step, training iteration, memory, warm-up, fixed overhead.

    python benchmarks/mada_cost.py                          # all sections, CPU
    python benchmarks/mada_cost.py --only step,overhead --json out.json

Sections (contenders interleaved in each, medians over repeats, ratios next to absolute times):
  step       optimizer step alone on the nanoGPT char-model shapes (6 layers, 6 heads,
             n_embd 384, vocab 65, block 256: 10.7M parameters), gradients given
  iteration  forward + backward + step of that model, batch 4 x 64 tokens
  memory     optimizer-state bytes per parameter and peak RSS, each contender in its own process
  warmup     optimizer construction (the native kernel's build), first iteration (compilation
             included; fresh inductor and metaopt caches) and steady iterations
  overhead   one-element parameter, the online problem of Reddi et al. (f_t(x) = 1010x if
             t mod 101 = 1 else -10x, x in [-1, 1]): fixed per-iteration cost

Contenders: torch.optim.Adam(foreach=True), Adam(fused=True), and metaopt MADA with one-step
hyper-gradients on each of its paths: native (the default on CPU: MADA's C kernel, no
torch.compile), compiled (path="fused", compile=True: the whole step one inductor graph),
generic eager (path="generic": the rule differentiated by autograd), fused eager (overhead
section only); and a per-tensor autograd MADA in the authors' style
(benchmarks/authors_style.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from authors_style import AuthorsStyleMADA  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402

from metaopt import MetaOptimizer, OneStep  # noqa: E402
from metaopt.plugins.mada import MADA  # noqa: E402

warnings.filterwarnings("ignore")
CONTENDERS = ["Adam(foreach)", "Adam(fused)", "MADA native (default)", "MADA compiled", "MADA generic eager",
              "MADA authors-style"]


class Runner:
    """A model and an optimizer behind one interface: loss(inputs), zero_grad(), step()."""

    def __init__(self, kind: str, model: torch.nn.Module, lr: float = 1e-3) -> None:
        self.kind, self.model = kind, model
        params = list(model.parameters())
        if kind == "MADA authors-style":
            self.opt = AuthorsStyleMADA(model, lr=lr)
            self.params = self.opt.params
            return
        self.params = None
        self.opt = {
            "Adam(foreach)": lambda: torch.optim.Adam(params, lr=lr, foreach=True),
            "Adam(fused)": lambda: torch.optim.Adam(params, lr=lr, fused=True),
            "Adam": lambda: torch.optim.Adam(params, lr=lr),
            "MADA native (default)": lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=lr),
            "MADA compiled": lambda: MetaOptimizer(
                params, MADA(), hypergrad=OneStep(), lr=lr, path="fused", compile=True),
            "MADA generic eager": lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=lr, path="generic"),
            "MADA fused eager": lambda: MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=lr, path="fused"),
        }[kind]()
        if kind == "MADA native (default)" and self.opt.path != "native":
            raise SystemExit(f"the default path here is {self.opt.path!r}, not native: is a C compiler installed?")

    def loss(self, *inputs):
        out = self.opt.loss(*inputs) if self.params is not None else self.model(*inputs)
        return out[1] if isinstance(out, tuple) else out

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()

    def tensors(self):
        return list(self.params.values()) if self.params is not None else list(self.model.parameters())

    def state_bytes(self) -> int:
        if self.params is not None:
            return self.opt.state_bytes()
        # distinct storages, so that state views into flat buffers count once; plus the
        # compiled path's gradient workspace
        storages = {}
        for s in self.opt.state.values():
            for t in s.values():
                if torch.is_tensor(t):
                    st = t.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
        workspace = sum(b.workspace_bytes() for b in getattr(getattr(self.opt, "_path", None), "buckets", {}).values())
        return sum(storages.values()) + workspace


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    times = {n: [] for n in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def table(title: str, med: dict[str, float], base: str, unit: str = "ms", extra_base: str | None = None) -> list[dict]:
    print(f"\n{title}")
    head = f"{'contender':<24}{unit:>10}{'x ' + base:>20}"
    if extra_base:
        head += f"{'x ' + extra_base:>20}"
    print(head)
    rows = []
    for n, m in med.items():
        row = {"contender": n, "median_s": m, f"ratio_to_{base}": m / med[base]}
        line = f"{n:<24}{m * 1e3:>10.3f}{m / med[base]:>20.2f}"
        if extra_base:
            row[f"ratio_to_{extra_base}"] = m / med[extra_base]
            line += f"{m / med[extra_base]:>20.2f}"
        print(line)
        rows.append(row)
    return rows


def gpt_runners(kinds):
    runners = {}
    for kind in kinds:
        torch.manual_seed(0)
        runners[kind] = Runner(kind, GPT(GPTConfig()))
    return runners


def section_step(args) -> list[dict]:
    runners = gpt_runners(CONTENDERS)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in runners["Adam(fused)"].tensors()]

    def stepper(r):
        if r.params is None:
            for p, g in zip(r.tensors(), grads):
                p.grad = g
            return r.step

        def step():  # the authors' style makes new parameter tensors every step
            for p, g in zip(r.tensors(), grads):
                p.grad = g
            r.step()
        return step

    med = interleaved({k: stepper(r) for k, r in runners.items()}, args.repeats, warmup=2)
    n = sum(p.numel() for p in GPT(GPTConfig()).parameters())
    return table(f"optimizer step alone, nanoGPT char model ({n / 1e6:.1f}M params)", med, "Adam(fused)",
                 extra_base="Adam(foreach)")


def batch(gen, b=4, t=64):
    x = torch.randint(0, 65, (b, t + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


def section_iteration(args) -> list[dict]:
    runners = gpt_runners(CONTENDERS)
    gen = torch.Generator().manual_seed(1)
    data = [batch(gen) for _ in range(8)]
    counters = {k: 0 for k in runners}

    def iteration(k, r):
        def run():
            x, y = data[counters[k] % len(data)]
            counters[k] += 1
            r.zero_grad()
            r.loss(x, y).backward()
            r.step()
        return run

    med = interleaved({k: iteration(k, r) for k, r in runners.items()}, args.repeats, warmup=3)
    return table("training iteration (forward, backward, step), batch 4 x 64", med, "Adam(fused)",
                 extra_base="Adam(foreach)")


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux). Unlike ru_maxrss, VmHWM restarts at exec, so
    a spawned child does not inherit its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _memory_child(kind: str, queue) -> None:
    cache = tempfile.mkdtemp(prefix="inductor-cold-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on a user's first run
    os.environ["METAOPT_CACHE_DIR"] = cache  # and a cold build of the native kernel
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    t0 = time.perf_counter()
    r = Runner(kind, model)  # the native path builds its C kernel here
    build = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    rss0 = _rss_mb("VmRSS")
    times = []
    for _ in range(6):
        x, y = batch(gen)
        t0 = time.perf_counter()
        r.zero_grad()
        r.loss(x, y).backward()
        r.step()
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in r.model.parameters())
    peak = _rss_mb("VmHWM")
    queue.put({"contender": kind, "state_bytes_per_param": r.state_bytes() / n,
               "peak_rss_mb": peak, "rss_growth_mb": peak - rss0,
               "construction_s": build, "first_iteration_s": times[0],
               "steady_iteration_s": statistics.median(times[2:])})


def in_fresh_processes(child, kinds) -> list[dict]:
    """``child(kind, queue)`` run for each kind in a fresh (spawned) interpreter, one after the
    other; what each puts on the queue."""
    ctx = mp.get_context("spawn")
    rows = []
    for kind in kinds:
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(kind, q))
        p.start()
        rows.append(q.get())
        p.join()
    return rows


def section_memory_and_warmup(args) -> list[dict]:
    rows = in_fresh_processes(_memory_child, CONTENDERS)
    print("\nmemory and warm-up (each contender in a fresh process, cold inductor cache)")
    print(f"{'contender':<24}{'state B/param':>14}{'peak RSS MB':>13}{'+ training':>12}{'construct s':>13}"
          f"{'first iter s':>14}{'steady s':>10}")
    print("(+ training: peak minus the RSS once the model was built; construct: the optimizer's constructor,"
          " where the native path builds its kernel)")
    for r in rows:
        print(f"{r['contender']:<24}{r['state_bytes_per_param']:>14.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['rss_growth_mb']:>12.0f}{r['construction_s']:>13.2f}{r['first_iteration_s']:>14.2f}"
              f"{r['steady_iteration_s']:>10.3f}")
    return rows


class Reddi(torch.nn.Module):
    """f_t(x) = 1010·x if t mod 101 = 1 else −10·x (Reddi, Kale & Kumar, ICLR 2018)."""

    def __init__(self) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(1))

    def forward(self, coef):
        return (coef * self.x).sum()


def section_overhead(args) -> list[dict]:
    kinds = ["Adam", "MADA native (default)", "MADA generic eager", "MADA fused eager", "MADA compiled",
             "MADA authors-style"]
    runners = {}
    for k in kinds:
        runners[k] = Runner(k, Reddi())
    t = {k: 0 for k in kinds}
    c_big, c_small = torch.tensor(1010.0), torch.tensor(-10.0)

    def iteration(k, r):
        def run():
            t[k] += 1
            r.zero_grad()
            r.loss(c_big if t[k] % 101 == 1 else c_small).backward()
            r.step()
            with torch.no_grad():
                for p in r.tensors():
                    p.clamp_(-1.0, 1.0)
        return run

    fns = {k: iteration(k, r) for k, r in runners.items()}
    med = interleaved(fns, repeats=args.repeats * 20, warmup=20)
    return table("fixed per-iteration overhead, one-element parameter (Reddi et al.)", med, "Adam")


SECTIONS = {"step": section_step, "iteration": section_iteration,
            "memory": section_memory_and_warmup, "overhead": section_overhead}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="step,iteration,memory,overhead",
                    help="comma-separated sections: step, iteration, memory (with warm-up), overhead")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    results = {}
    for name in args.only.split(","):
        results[name] = SECTIONS[name](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "mada_cost", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
