"""Ways for the compiled bucketed step to read gradients and write parameters where they live,
measured against what it does today (gather the gradients into a flat copy, write a flat update,
add it with one foreach call).

    python benchmarks/in_place_alternatives.py                    # rule and grads sections
    python benchmarks/in_place_alternatives.py --only one_graph   # slow: a cold compile
    python benchmarks/in_place_alternatives.py --json out.json

Sections (nanoGPT char model, 10.7M parameters in 76 tensors; contenders interleaved, medians of
per-round medians, ratios next to absolute times):
  rule       MADA's hand-derived compiled rule with one-step tangents, without the dot products
             and the hyper-step (the same in every contender): over the flat bucket (gather,
             graph, foreach add; today's step) against the per-tensor compiled rule (one graph
             with a dynamic length, called per parameter; reads each gradient and writes each
             parameter in place); the foreach add of today's step alone, which bounds what
             parameters as views of a flat buffer could save; Adam(fused=True) as the baseline
  grads      what the backward costs when the gradients land in views of one flat buffer
             (zeroed in place, then accumulated into by autograd) against freshly allocated
             gradients (zero_grad(set_to_none=True)) and against those plus today's gather
  one_graph  the cold compile (fresh process, empty inductor cache) of one graph that runs the
             rule parameter by parameter over per-tensor inputs, reading and writing in place
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from mada_cost import in_fresh_processes, table  # noqa: E402

from metaopt import MetaOptimizer, OneStep  # noqa: E402
from metaopt.plugins.mada import MADA  # noqa: E402
from metaopt.types import STEP, family_state  # noqa: E402

warnings.filterwarnings("ignore")


def rounds(fns: dict, n_rounds: int, per_round: int, before=None) -> dict[str, float]:
    """Median over rounds of each contender's per-round median, contenders interleaved."""
    res = {k: [] for k in fns}
    for _ in range(n_rounds):
        for k, fn in fns.items():
            ts = []
            for _ in range(per_round):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[k].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in res.items()}


def model_and_grads():
    torch.manual_seed(0)
    params = list(GPT(GPTConfig()).parameters())
    gen = torch.Generator().manual_seed(0)
    return params, [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]


def compiled_mada(params, grads):
    """A MADA optimizer on the hand-derived compiled path, three steps in (state bucketed)."""
    opt = MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=1e-3, path="fused", compile=True)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return opt


def section_rule(args) -> list[dict]:
    params, grads = model_and_grads()
    opt = compiled_mada(params, grads)
    path, record = opt._path, opt._hyper

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    @torch.no_grad()
    def bucketed():  # today's step, less the dot products and the hyper-step
        work = path.bucket_plan(opt.param_groups, opt.state)
        path._run_rules(record, None, path._bucket_items(work))

    @torch.no_grad()
    def per_tensor():  # the same rule, compiled once with a dynamic length, called per parameter
        path.rule_per_tensor(opt.param_groups, opt.state, record.coefficients)

    bucket = next(iter(path.buckets.values()))

    @torch.no_grad()
    def foreach_add():  # the part of today's step that parameters as flat views would save
        torch._foreach_add_(bucket.params, bucket.delta_views)

    adam = torch.optim.Adam(params, lr=1e-3, fused=True)
    fns = {"Adam(fused)": adam.step, "bucketed (today)": bucketed, "per-tensor, in place": per_tensor,
           "its foreach add alone": foreach_add}
    for fn in fns.values():  # warm-up: compile both
        for _ in range(3):
            set_grads()
            fn()
    med = rounds(fns, args.rounds, args.per_round, before=set_grads)
    return table(f"compiled MADA rule with tangents, {len(params)} tensors, {sum(map(torch.numel, params)) / 1e6:.1f}M",
                 med, "Adam(fused)")


def section_grads(args) -> list[dict]:
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    params = list(model.parameters())
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    y = torch.randint(0, cfg.vocab_size, (4, 64))
    numels = [p.numel() for p in params]
    flat = torch.zeros(sum(numels))
    views = [v.view(p.shape) for p, v in zip(params, flat.split(numels))]
    gathered = [v.view(p.shape) for p, v in zip(params, torch.empty(sum(numels)).split(numels))]

    def backward():
        out = model(x, y)
        (out[1] if isinstance(out, tuple) else out).backward()

    def fresh():
        for p in params:
            p.grad = None
        backward()

    def fresh_then_gather():
        fresh()
        torch._foreach_copy_(gathered, [p.grad for p in params])

    def into_views():
        flat.zero_()
        for p, v in zip(params, views):
            p.grad = v
        backward()
        if params[0].grad.data_ptr() != views[0].data_ptr():
            raise SystemExit("autograd replaced the gradient view: the comparison would be void")

    fns = {"fresh grads": fresh, "fresh + gather": fresh_then_gather, "zeroed flat views": into_views}
    for fn in fns.values():
        fn()
        fn()
    med = rounds(fns, args.rounds, args.per_round)
    return table("forward + backward, nanoGPT char model, batch 4x64", med, "fresh grads")


def _one_graph_child(kind, queue):
    cache = tempfile.mkdtemp(prefix="inductor-cold-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    params, grads = model_and_grads()
    opt = compiled_mada(params, grads)
    path, record = opt._path, opt._hyper
    bucket = next(iter(path.buckets.values()))
    flat_state = family_state(bucket.flat)
    hp = path.hyperparameters(opt.param_groups[0], compiled=True)

    def rule(family, learned, names, coef, grads, params, flat_state, tangents, numels, step, hp):
        scalars = family.fused_scalars({n: coef[i] for i, n in enumerate(names)}, hp, step, learned)
        st_parts = {k: v.split(numels) for k, v in flat_state.items()}
        t_parts = [t.split(numels) for t in tangents]
        for i, (g, p) in enumerate(zip(grads, params)):
            s = {k: v[i] for k, v in st_parts.items()}
            delta, new_state, tans = family.fused_update(g.view(-1), p.view(-1), s, scalars, learned)
            p.view(-1).add_(delta)
            for k, v in new_state.items():
                s[k].copy_(v)
            for t, new in zip(t_parts, tans):
                t[i].copy_(new.expand_as(t[i]))

    compiled = torch.compile(rule, dynamic=False)
    args = (path.family, path.learned, path.names, record.coefficients, grads, params, flat_state,
            bucket.tangents, bucket.numels, opt.state[params[0]][STEP], hp)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(*args)
        first = time.perf_counter() - t0
    queue.put({"contender": kind, "tensors": len(params), "first_call_s": first})


def section_one_graph(args) -> list[dict]:
    rows = in_fresh_processes(_one_graph_child, ["one graph over per-tensor inputs"])
    for r in rows:
        print(f"\none graph, {r['tensors']} tensors: first call (cold compile) {r['first_call_s']:.0f} s")
    return rows


SECTIONS = {"rule": section_rule, "grads": section_grads, "one_graph": section_one_graph}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="rule,grads", help="comma-separated sections: rule, grads, one_graph")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    results = {name: SECTIONS[name](args) for name in args.only.split(",")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "in_place_alternatives", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
