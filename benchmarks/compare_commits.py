"""The same benchmark on several commits, interleaved: did a change make anything slower?

    python benchmarks/compare_commits.py fa8f764 HEAD --rounds 5 --only step,overhead

Each commit is exported (``git archive``) into a temporary directory; then, round after round,
each commit's own ``benchmarks/mada_cost.py`` runs in a fresh interpreter against its own code,
in turn and each round starting with the next commit, so that the machine's drift and noise
fall on every commit alike. ``WORKTREE`` names
the checkout as it is. Reported per contender: the median over rounds of each commit's time,
its ratio to the first commit, and the median ratio to ``Adam(fused)`` measured in the same
process (which cancels most of the load the machine had during that run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(ref: str, into: Path) -> Path:
    """The tree at ``ref``, runnable from a PYTHONPATH (the plugins mapped where the package
    configuration maps them: metaopt.plugins is the repository's plugins/)."""
    if ref == "WORKTREE":
        return ROOT
    tree = into / ref.replace("/", "_")
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    archive_path = into / f"{tree.name}.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(tree, filter="data")
    (tree / "metaopt" / "plugins").symlink_to("../plugins")
    return tree


def cpu() -> str:
    model, width = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    except (OSError, StopIteration):
        pass
    return f"{model}, {width}, {os.cpu_count()} cores"


def run_once(tree: Path, only: str, repeats: int, out: Path) -> dict:
    env = dict(os.environ)
    if tree != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / "mada_cost.py"), "--only", only, "--repeats", str(repeats),
         "--json", str(out)],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: mada_cost.py failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("refs", nargs="+", help="commits to compare (the first is the baseline); WORKTREE: the checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="step,overhead")
    ap.add_argument("--repeats", type=int, default=10, help="mada_cost.py's own repeats per run")
    ap.add_argument("--json", help="write the comparison here")
    args = ap.parse_args()
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory(prefix="metaopt-compare-") as tmp:
        trees = {ref: export(ref, Path(tmp)) for ref in args.refs}
        runs: dict[str, list[dict]] = {ref: [] for ref in args.refs}
        order = list(trees)
        for r in range(args.rounds):
            for ref in order[r % len(order):] + order[:r % len(order)]:  # each commit first in turn
                runs[ref].append(run_once(trees[ref], args.only, args.repeats, Path(tmp) / f"{r}.json"))
                print(f"round {r + 1}/{args.rounds}: {ref} done", file=sys.stderr)
    base = args.refs[0]
    report = {"cpu": cpu(), "refs": args.refs, "rounds": args.rounds, "sections": {}}
    for section in args.only.split(","):
        contenders = [row["contender"] for row in runs[base][0][section]]
        reference = "Adam(fused)" if "Adam(fused)" in contenders else contenders[0]
        print(f"\n{section}: median over {args.rounds} rounds (ms), x {base}, and x {reference} in the same run")
        print(f"{'contender':<24}" + "".join(f"{ref[:12]:>14}{'x base':>8}{'x ' + reference[:10]:>14}" for ref in args.refs))
        rows = []
        for name in contenders:
            line, row = f"{name:<24}", {"contender": name}
            base_ms = None
            for ref in args.refs:
                times = [next(x["median_s"] for x in run[section] if x["contender"] == name) for run in runs[ref]]
                rel = [next(x["median_s"] for x in run[section] if x["contender"] == name)
                       / next(x["median_s"] for x in run[section] if x["contender"] == reference) for run in runs[ref]]
                ms = statistics.median(times) * 1e3
                base_ms = base_ms or ms
                row[ref] = {"median_ms": ms, "ratio_to_base": ms / base_ms, f"ratio_to_{reference}": statistics.median(rel)}
                line += f"{ms:>14.3f}{ms / base_ms:>8.2f}{statistics.median(rel):>14.2f}"
            print(line)
            rows.append(row)
        report["sections"][section] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
