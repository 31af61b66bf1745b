"""The examples run and print what they promise."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_learns():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("learned coefficients:")
    coefs = ast.literal_eval(last.split(":", 1)[1].strip())
    assert coefs["beta3"] > 0.0  # moved off the Adam point


def test_one_step_vs_unrolled_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "one_step_vs_unrolled.py"), "--steps", "40"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0:2] for line in out.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["one-step", "unrolled", "unrolled"]


def test_readme_python_blocks_run():
    """Every ```python block of the README, run in order in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    built = []
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
        if "opt" in namespace:
            built.append(set(namespace["opt"].coefficients))
    assert {"beta1", "beta2", "beta3", "c", "rho"} in built  # the quickstart's MADA
    assert {"mu"} in built  # the user's own family was built
