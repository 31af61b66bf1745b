#!/usr/bin/env bash
# The GPU checks and benchmarks in one run, under 10 minutes, results as JSON.
#
#   benchmarks/gpu.sh prepare     # here, where PyPI is reachable: the wheels a bare GPU image
#                                 # lacks (pydantic and its parts, higher), into .whl/ (ignored)
#   benchmarks/gpu.sh [OUTDIR]    # on the GPU machine; OUTDIR defaults to $OUT, else
#                                 # benchmarks/results/gpu
#
# On the GPU machine it installs metaopt (and .whl/ if present) into /tmp/site without touching
# the image's torch, then writes to OUTDIR:
#   env.json          GPU, driver, torch, CUDA, CPU
#   gpu_bench.json    benchmarks/gpu_bench.py: step and iteration of the nanoGPT char model and
#                     the step of GPT-2-small shapes, for Adam(fused=True), MADA compiled, MADA
#                     on the automatic compiled path and Padam (only `update`) compiled; syncs
#                     per step (set_sync_debug_mode("error")) and first-step (compile) times
#   cuda_tests.json   the CUDA tests (tests/test_cuda.py and the CUDA test of test_engine.py),
#                     each with its outcome; cuda_tests.log their output
#   torchrun.json     `metaopt run` of the quick job on the GPU in one process and under torchrun
#                     (2 processes over NCCL, DDP and FSDP2, where there are 2 GPUs; else 1):
#                     exit codes, steps/s, and the largest loss difference from one process;
#                     torchrun.log their output
# (python3 -P: the checkout's metaopt/ must not shadow the installed package, whose
# metaopt.plugins maps plugins/.) Each part has its own time limit, so a slow compile cannot take the whole run down; the
# benchmark writes its JSON after every section.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 higher==0.2.1)

if [ "${1:-}" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

OUTDIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS="$(nproc)"
SITE=/tmp/metaopt-site
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

python3 - "$OUTDIR/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as err:  # noqa: BLE001
    info["nvidia_smi"] = repr(err)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF

status=0
timeout 300 python3 benchmarks/gpu_bench.py --json "$OUTDIR/gpu_bench.json" || status=$?

timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_engine.py::test_step_never_synchronises_on_cuda" \
    --junitxml="$OUTDIR/cuda_tests.xml" > "$OUTDIR/cuda_tests.log" 2>&1 || status=$?
tail -5 "$OUTDIR/cuda_tests.log"
python3 - "$OUTDIR" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
try:
    root = ET.parse(f"{out}/cuda_tests.xml").getroot()
except (OSError, ET.ParseError) as err:
    json.dump({"error": repr(err)}, open(f"{out}/cuda_tests.json", "w")); sys.exit()
cases = []
for case in root.iter("testcase"):
    kids = [k.tag for k in case]
    outcome = "failed" if {"failure", "error"} & set(kids) else "skipped" if "skipped" in kids else "passed"
    msg = next((k.get("message", "") for k in case if k.tag in ("failure", "error", "skipped")), "")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0)), "message": msg[:500]})
json.dump({"cases": cases, "passed": sum(c["outcome"] == "passed" for c in cases),
           "failed": sum(c["outcome"] == "failed" for c in cases)}, open(f"{out}/cuda_tests.json", "w"), indent=2)
EOF
rm -f "$OUTDIR/cuda_tests.xml"

# metaopt run under torchrun. PYTHONSAFEPATH: torchrun's processes, like python3 -P, must import
# the installed package, not the checkout.
export PYTHONSAFEPATH=1
NGPU="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
NP=$(( NGPU >= 2 ? 2 : 1 ))
JOB=(run --quick --device cuda --steps 200 --no-progress)
mkdir -p "$OUTDIR/torchrun"
: > "$OUTDIR/torchrun.log"
timeout 90 python3 -m metaopt "${JOB[@]}" --out "$OUTDIR/torchrun/one" >> "$OUTDIR/torchrun.log" 2>&1
echo "one $?" > "$OUTDIR/torchrun.codes"
for strategy in ddp fsdp2; do
    timeout 90 python3 -m torch.distributed.run --standalone --nproc-per-node "$NP" -m metaopt "${JOB[@]}" \
        --set "distributed.strategy=$strategy" --out "$OUTDIR/torchrun/$strategy" >> "$OUTDIR/torchrun.log" 2>&1
    echo "$strategy $?" >> "$OUTDIR/torchrun.codes"
done
python3 - "$OUTDIR" "$NGPU" "$NP" <<'EOF' || status=1
import glob, json, sys
out, ngpu, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
codes = dict(line.split() for line in open(f"{out}/torchrun.codes"))
def found(name, file):
    paths = glob.glob(f"{out}/torchrun/{name}/*/{file}")
    return paths[0] if paths else None
def metrics(name):
    path = found(name, "metrics.jsonl")
    return {(r["optimizer"], r["step"]): r for r in map(json.loads, open(path))} if path else None
def speed(name):
    path = found(name, "summary.json")
    return {k: v["steps_per_s"]["mean"] for k, v in json.load(open(path))["optimizers"].items()} if path else None
one = metrics("one")
result = {"gpus": ngpu, "nproc": nproc, "exit_codes": codes, "steps_per_s": {n: speed(n) for n in ("one", "ddp", "fsdp2")}}
for name in ("ddp", "fsdp2"):
    run = metrics(name)
    if one and run:
        result[f"{name}_max_loss_diff"] = max(abs(run[k][f] - one[k][f]) for k in one for f in ("train_loss", "val_loss")
                                              if k in run and one[k][f] is not None and run[k][f] is not None)
json.dump(result, open(f"{out}/torchrun.json", "w"), indent=2)
print(result)
sys.exit(any(c != "0" for c in codes.values()))
EOF
exit $status
