"""Native kernels: a family's rule as a C kernel, compiled once per machine, run on CPU threads.

Built and loaded here; ``metaopt.paths.native`` is the path that runs them.

A family that ships a C version of its fused rule (see ``csrc/native.h`` for the ABI, and
``plugins/mada.c``) gets a CPU step near the memory-bandwidth floor without ``torch.compile``:
per param group, one pass over gradients and tangents for the hyper-gradient's dot products
and one pass that reads each element's gradient, state and parameter once and writes the new
state, the tangents and the parameter. Parameters and gradients are read where they are (no
gathering copy); the state lives in the group's flat buffers. Each pass is split between
``torch.get_num_threads()`` OpenMP threads — torch's own OpenMP runtime, so no second pool
competes with the threads torch's kernels just used.

The C file is compiled by the system C compiler (``$CC``, else ``cc``) on first use, with
``-O3 -march=native -fopenmp`` (without ``-fopenmp`` where the compiler lacks it: one thread),
into a cache directory (``$METAOPT_CACHE_DIR``, else ``~/.cache/metaopt``) keyed by the
sources, the flags, the compiler and the CPU; it takes about a second, and later processes
load it in milliseconds. Where no compiler works, ``load`` warns once and returns None and
the optimizer takes another path (``metaopt.paths.select_path``). ``METAOPT_NATIVE=0`` turns the native path off;
``METAOPT_NATIVE_MARCH`` replaces ``-march=native`` (e.g. ``x86-64-v3``: an AVX2 build).

A kernel must vectorize to be worth having: after each build the object code is read
(``vector_report``, ``objdump -d``) for packed square roots in the rule, one per element (for a
rule without square roots, packed arithmetic). Where there are none the build is scalar code,
slower than the compiled path (docs: Performance, "One fast path on every CPU kind"); ``load``
warns, and ``compile=True`` then takes the compiled path.

Kernels read the coefficients and the step count from the tensors' memory, as a GPU kernel
reads device memory: nothing is copied to Python objects, so a step stays free of host reads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

Tensor = torch.Tensor

CSRC = Path(__file__).parent / "csrc"
#: no -ffast-math: IEEE semantics (NaN, signed zero) as torch's eager ops have them; no FMA
#: contraction, so that results round as the torch reference's separate ops do
PORTABLE_FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
#: tried first, with -fopenmp, then without it (Apple's clang has none: one thread), then the
#: portable flags alone. -fno-trapping-math (clang's default) lets gcc if-convert selects whose
#: arms divide or compare: under gcc's default the rule's loop stayed scalar on AVX2 (AVX-512's
#: masked ops hid it); results are unchanged, only FP exception flags, which torch never reads.
TUNED_FLAGS = PORTABLE_FLAGS + ("-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
if _X86:
    TUNED_FLAGS += ("-mprefer-vector-width=512",)  # full-width vectors where AVX-512 exists (docs: Performance)
#: the most state buffers, and the most tangents, a kernel's piece holds (``csrc/native.h``'s
#: METAOPT_MAX_BUFFERS, read from there so that the header stays its one owner)
MAX_BUFFERS = int(re.search(r"#define METAOPT_MAX_BUFFERS (\d+)", (CSRC / "native.h").read_text()).group(1))
#: below this many elements per thread, splitting a pass costs more than it saves
MIN_PER_THREAD = 1 << 15
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@dataclass(frozen=True)
class NativeRule:
    """What a family hands the engine for the native path (``Family.native_rule``).

    ``source``: the C file defining ``metaopt_rule_f32``/``_f64`` (``csrc/native.h``);
    ``state_keys``: the family state buffers in the order the kernel indexes them;
    ``options``: the integers the kernel receives as ``opt``; ``flags``: see below.
    """

    source: Path
    state_keys: tuple[str, ...]
    options: tuple[int, ...] = ()
    #: compiler flags tried first, the build retried without them where they fail (e.g.
    #: ``VECTOR_MATH_FLAGS``)
    flags: tuple[str, ...] = ()


def supports(dtype: torch.dtype) -> bool:
    """Whether native kernels take parameters of ``dtype`` (float32 and float64)."""
    return dtype in _SUFFIX


def enabled() -> bool:
    """Whether the native path is on: ``METAOPT_NATIVE`` unset, or not 0/false/off/empty."""
    return os.environ.get("METAOPT_NATIVE", "1") not in ("0", "false", "off", "")


class Kernel:
    """A loaded native library: ``step`` (the rule) and ``dots`` for both element types.

    Each takes the number of threads and the length of the flat index space first.
    """

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        for suffix in _SUFFIX.values():
            step = getattr(self.lib, f"metaopt_step_{suffix}")
            step.argtypes = [i64, i64, i64, p, p, p, i64, p, i64, p, p, p, p, p]
            step.restype = None
            dots = getattr(self.lib, f"metaopt_dots_{suffix}")
            dots.argtypes = [i64, i64, i64, p, p, i64, p, p]
            dots.restype = None
        self.openmp = bool(self.lib.metaopt_openmp())
        self.path = path
        self.vector: dict = {"vectorized": None}  # vector_report(path), set by load()

    @property
    def vectorized(self) -> bool | None:
        """Whether the rule's loop compiled to packed instructions (None: not told here)."""
        return self.vector.get("vectorized")

    def fn(self, kind: str, dtype: torch.dtype):
        """The C function ``kind`` (``"step"`` or ``"dots"``) for element type ``dtype``."""
        return getattr(self.lib, f"metaopt_{kind}_{_SUFFIX[dtype]}")


def tuned_flags() -> tuple[str, ...]:
    """TUNED_FLAGS with ``-march=$METAOPT_NATIVE_MARCH`` in place of ``-march=native`` where set.

    For a cache shared by machines of different kinds; benchmarks of an AVX2 build on an AVX-512
    machine.
    """
    march = os.environ.get("METAOPT_NATIVE_MARCH")
    return tuple(f"-march={march}" if march and f == "-march=native" else f for f in TUNED_FLAGS)


#: square roots in a disassembly, packed and scalar (x86: SSE/AVX/AVX-512; arm64: NEON/SVE). The
#: rule takes one per element, so a rule function without a packed one runs as scalar code.
_PACKED_SQRT = re.compile(r"\b(?:v?sqrtp[sd]\s.*%([xyz])mm|fsqrt\s+(?:v\d+\.[24][sd]|z\d+\.[sd]))")
_SCALAR_SQRT = re.compile(r"\b(?:v?sqrts[sd]\s|fsqrt\s+[sd]\d)")
_FUNCTION = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
#: the rule and what it may be inlined into: the driver's range loop, the step and its OpenMP bodies
_RULE_SYMBOL = re.compile(r"metaopt_(?:rule|rule_range|step)_(f32|f64)(?:\.(?:constprop|_omp_fn)\.\d+)*")


def _rule_lines(text: str):
    """(element type, instruction line) for each line of an ``objdump -d`` listing inside the rule.

    The rule: the family's rule function and what it may be inlined into (``_RULE_SYMBOL``); a
    type appears, with no lines, where its rule has none.
    """
    dtype = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            rule = _RULE_SYMBOL.fullmatch(m.group(1))
            dtype = rule.group(1) if rule else None
            if dtype:
                yield dtype, None
        elif dtype:
            yield dtype, line


def disassembly_counts(text: str) -> dict[str, dict[str, int]]:
    """Per element type of an ``objdump -d`` listing, its packed and scalar square roots in the rule.

    Element types ``f32``, ``f64``; the packed square roots by register width (``xmm``, ``ymm``,
    ``zmm``; ``neon`` on arm64) and the scalar ones.
    """
    counts: dict[str, dict[str, int]] = {}
    for dtype, line in _rule_lines(text):
        current = counts.setdefault(dtype, {})
        packed = _PACKED_SQRT.search(line or "")
        if packed:
            width = (packed.group(1) + "mm") if packed.group(1) else "neon"
            current[width] = current.get(width, 0) + 1
        elif _SCALAR_SQRT.search(line or ""):
            current["scalar"] = current.get("scalar", 0) + 1
    return counts


#: packed and scalar float arithmetic (x86 SSE/AVX/AVX-512), for rules without a square root
_ARITH = re.compile(r"\bv?(?:add|sub|mul|div|min|max)([ps])[sd]\s")


def arithmetic_counts(text: str) -> dict[str, dict[str, int]]:
    """Per element type of an ``objdump -d`` listing, the packed and scalar float arithmetic in the rule."""
    counts: dict[str, dict[str, int]] = {}
    for dtype, line in _rule_lines(text):
        current = counts.setdefault(dtype, {"packed": 0, "scalar": 0})
        op = _ARITH.search(line or "")
        if op:
            current["packed" if op.group(1) == "p" else "scalar"] += 1
    return counts


def vector_report(library: Path) -> dict:
    """Whether the built rule vectorized, read from its object code (``objdump -d``).

    Per rule element type, its square roots (``disassembly_counts``) and its float arithmetic
    (``arithmetic_counts``); ``vectorized`` is True where both types' rules have packed square
    roots (or, for a rule without any, packed arithmetic), None where that cannot be told (no objdump,
    another architecture, no rule symbols). Cached beside the library.
    """
    sidecar = Path(str(library) + ".vec.json")
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        pass
    report: dict = {"sqrt": {}, "vectorized": None}
    tool = shutil.which("objdump")
    if tool and (_X86 or platform.machine().lower() in ("aarch64", "arm64")):
        try:
            text = subprocess.run([tool, "-d", str(library)], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        counts, arith = disassembly_counts(text), arithmetic_counts(text)
        if set(counts) == set(_SUFFIX.values()):
            # a rule with a square root must take it packed; one without, its arithmetic
            report = {"sqrt": counts, "arith": arith, "checked_by": "objdump -d", "vectorized": all(
                any(k != "scalar" for k in counts[t]) if counts[t] else arith.get(t, {}).get("packed", 0) > 0
                for t in counts)}
    try:
        sidecar.write_text(json.dumps(report))
    except OSError:
        pass
    return report


def cache_dir() -> Path:
    """Where built kernels live: ``$METAOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/metaopt`` or ``~/.cache/metaopt``."""
    root = os.environ.get("METAOPT_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaopt"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a -march=native build is only valid on the same kind."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    sig += line
                if line.strip() == "":
                    break
    except OSError:
        sig += platform.processor()
    return sig


#: glibc's vector math library: a source that declares libm functions ``__simd__`` under
#: ``METAOPT_MVEC`` gets their vector forms (``metaopt.codegen``)
VECTOR_MATH_FLAGS = ("-DMETAOPT_MVEC", "-lmvec")


@functools.lru_cache(maxsize=None)
def load(source: Path, flags: tuple[str, ...] = ()) -> Kernel | None:
    """The kernel built from ``source`` (compiled now, or loaded from the cache).

    ``flags``: tried first (``NativeRule.flags``). None, with a warning, where it cannot be
    built.
    """
    if not enabled():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        warnings.warn("metaopt: no C compiler found (set CC); the native path is off")
        return None
    driver = CSRC / "driver.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"metaopt: C compiler {cc!r} does not run ({err}); the native path is off")
        return None
    key = hashlib.sha256()
    for part in (driver.read_bytes(), (CSRC / "native.h").read_bytes(), Path(source).read_bytes()):
        key.update(part)
    flags_tuned = tuned_flags()
    key.update(repr((flags_tuned, tuple(flags), version, _cpu_signature())).encode())
    name = f"{Path(source).stem}-{key.hexdigest()[:20]}.so"
    out = cache_dir() / name
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable cache (a read-only home): build for this process only
            out = Path(tempfile.mkdtemp(prefix="metaopt-")) / name
        try:
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                built = Path(tmp) / name
                files = [f"-I{CSRC}", f'-DMETAOPT_FAMILY_SOURCE="{Path(source).resolve()}"', str(driver),
                         "-o", str(built), "-lm"]
                tries = [(*flags_tuned, "-fopenmp"), flags_tuned, PORTABLE_FLAGS]
                if flags:
                    tries = [(*flags_tuned, "-fopenmp", *flags), (*flags_tuned, *flags), *tries]
                for tried in tries:
                    libs = [f for f in tried if f.startswith("-l")]  # after the sources that need them
                    res = subprocess.run([cc, *(f for f in tried if f not in libs), *files, *libs],
                                         capture_output=True, text=True, timeout=300)
                    if res.returncode == 0:
                        break
                else:
                    warnings.warn(f"metaopt: compiling {source} failed; the native path is off:\n{res.stderr[-2000:]}")
                    return None
                os.replace(built, out)  # atomic: a concurrent process sees all of it or none
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(f"metaopt: could not build {source} ({err}); the native path is off")
            return None
    try:
        kernel = Kernel(out)
        kernel.vector = vector_report(out)
        if kernel.vectorized is False:
            warnings.warn(f"metaopt: the native kernel {out.name} built as scalar code here (no packed square "
                          "root, or for a rule without one no packed arithmetic, in its object code); compile=True "
                          "takes the compiled path instead")
        return kernel
    except (OSError, AttributeError) as err:
        warnings.warn(f"metaopt: could not load {out} ({err}); the native path is off")
        return None


def threads_for(n: int) -> int:
    """Threads for a pass over n elements: torch's intra-op count, fewer for small n."""
    return max(1, min(torch.get_num_threads(), n // MIN_PER_THREAD))


def pointers(tensors: Sequence[Tensor]):
    """A C array of the tensors' data addresses (the caller keeps the tensors alive)."""
    return (ctypes.c_int64 * max(1, len(tensors)))(*(t.data_ptr() for t in tensors))


def int_array(values: Sequence[int]):
    """A C array of int64."""
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def double_array(values: Sequence[float]):
    """A C array of doubles."""
    return (ctypes.c_double * max(1, len(values)))(*values)

