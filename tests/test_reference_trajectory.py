"""Nothing changes numerically: the engine reproduces, bit for bit, the trajectory recorded
before its execution paths moved into modules (``tests/reference_trajectory.py`` says what is
recorded and under which pinned numeric environment; ``record`` rewrites it when a change is
meant to change numbers, and the commit must say so)."""

from __future__ import annotations

import pytest
import reference_trajectory as reference

FAST = [name for name in reference.cases() if not name.startswith("compiled")]
COMPILED = [name for name in reference.cases() if name.startswith("compiled")]
why_not = reference.machine_fits()


def check(names):
    done = reference.run_pinned("check", names)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("bit-identical") == len(names), done.stdout


@pytest.mark.skipif(why_not is not None, reason=str(why_not))
def test_every_eager_path_and_mode_reproduces_the_reference_bit_for_bit():
    check(FAST)


@pytest.mark.slow
@pytest.mark.skipif(why_not is not None, reason=str(why_not))
def test_the_compiled_path_reproduces_the_reference_bit_for_bit():
    check(COMPILED)

