"""The native kernel must be vector code, on AVX2 as well as on the CPU it is built on: its
object code is read (``objdump -d``) for packed square roots in the rule, one per element. A
scalar build ran at 14.6x fused Adam's step on an AVX2 EPYC (issue 12), slower than the
compiled path; the engine must tell such a build and leave it under ``compile=True``.

(That the vector code computes the same numbers is the reference trajectory's business:
``tests/test_reference_trajectory.py`` runs an AVX2 build against trajectories recorded with
the scalar one, bit for bit.)"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from metaopt import MetaOptimizer, kernels
from metaopt.plugins.mada import MADA

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_objdump = pytest.mark.skipif(not (X86 and shutil.which("objdump")),
                                   reason="the packed-instruction check reads x86 object code with objdump")

#: mada.c instantiates its loop three times per element type (the default configuration, the
#: fixed rule, run-time flags): each must vectorize
LOOPS = 3


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def build(monkeypatch, tmp_path, march: str | None = None, cc: str | None = None) -> kernels.Kernel:
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    if march:
        monkeypatch.setenv("METAOPT_NATIVE_MARCH", march)
    if cc:
        monkeypatch.setenv("CC", cc)
    kernels.load.cache_clear()
    try:
        kernel = kernels.load(MADA().native_rule(()).source)
    finally:
        kernels.load.cache_clear()
    assert kernel is not None
    return kernel


@needs_objdump
@pytest.mark.parametrize("march", ["x86-64-v3", "native"])
def test_the_native_rule_is_vector_code_on_avx2_and_on_this_cpu(monkeypatch, tmp_path, march):
    """x86-64-v3 is AVX2 (what an AVX2-only EPYC builds with -march=native); "native" is this
    machine, at its widest vectors (zmm under AVX-512: the build prefers 512-bit vectors)."""
    flags = cpu_flags()
    if march == "x86-64-v3" and "avx2" not in flags:
        pytest.skip("this CPU cannot load an AVX2 build")
    kernel = build(monkeypatch, tmp_path, march=march if march != "native" else None)
    widest = "ymm" if march == "x86-64-v3" else ("zmm" if "avx512f" in flags else "ymm" if "avx" in flags else "xmm")
    report = kernel.vector
    assert report["vectorized"] is True, report
    for dtype in ("f32", "f64"):
        assert report["sqrt"][dtype].get(widest, 0) >= LOOPS, (march, dtype, report)
    # and the sidecar holds it for the next process
    assert kernels.vector_report(kernel.path) == report


@needs_objdump
@pytest.mark.path_fallback  # asserts the fallback itself
def test_a_scalar_build_is_told_and_compile_then_takes_the_compiled_path(monkeypatch, tmp_path):
    """A compiler that cannot vectorize (here: gcc with its vectorizers turned off and no
    OpenMP simd) builds a kernel that works but is scalar code: a warning names it; without
    compile it still runs (faster than the eager paths); with compile=True the auto path takes
    the compiled fused rule instead; asked for by name, it runs."""
    real = shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "cc-scalar"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do shift; case "$a" in -fopenmp|-fopenmp-simd) ;; *) set -- "$@" "$a";; esac; done\n'
        f'exec {real} "$@" -fno-tree-vectorize -fno-tree-slp-vectorize\n'
    )
    wrapper.chmod(0o755)
    with pytest.warns(UserWarning, match="built as scalar code"):
        kernel = build(monkeypatch, tmp_path, cc=str(wrapper))
    assert kernel.vectorized is False
    assert all(not any(k != "scalar" for k in c) and c.get("scalar", 0) >= LOOPS
               for c in kernel.vector["sqrt"].values()), kernel.vector
    p = [torch.nn.Parameter(torch.zeros(4))]
    kernels.load.cache_clear()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert MetaOptimizer(p, MADA()).path == "native"
            opt = MetaOptimizer(p, MADA(), compile=True)
            assert opt.path == "fused" and "scalar" in opt.path_reason
            assert MetaOptimizer(p, MADA(), path="native", compile=True).path == "native"
    finally:
        kernels.load.cache_clear()


def test_the_disassembly_is_read_per_element_type():
    """The reader itself, on listings of each kind: AVX-512 and AVX2 packed, scalar, arm64 NEON;
    square roots outside the rule's functions do not count."""
    listing = """
0000000000001000 <metaopt_dots_f32>:
    1000:	62 f1 7c 48 51 c0    	vsqrtps %zmm0,%zmm0
0000000000002000 <metaopt_rule_f32>:
    2000:	62 f1 7c 48 51 c0    	vsqrtps %zmm0,%zmm0
    2006:	c5 fc 51 c0          	vsqrtps %ymm0,%ymm0
    200a:	c5 fa 51 c0          	vsqrtss %xmm0,%xmm0,%xmm0
0000000000003000 <metaopt_rule_range_f64>:
    3000:	f2 0f 51 c0          	sqrtsd %xmm0,%xmm0
    3004:	66 0f 51 c0          	sqrtpd %xmm0,%xmm0
0000000000004000 <metaopt_rule_f64>:
    4000:	1e 61 c0 00          	fsqrt	d0, d0
    4004:	6e e1 f8 00          	fsqrt	v0.2d, v0.2d
"""
    counts = kernels.disassembly_counts(listing)
    assert counts == {"f32": {"zmm": 1, "ymm": 1, "scalar": 1}, "f64": {"scalar": 2, "xmm": 1, "neon": 1}}
    assert kernels.disassembly_counts(listing.replace("vsqrtps", "vsqrtss").replace("sqrtpd", "sqrtsd")
                                     .replace("v0.2d, v0.2d", "d1, d1")) == {
        "f32": {"scalar": 3}, "f64": {"scalar": 4}}
