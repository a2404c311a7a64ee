#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU (H100/H200): correctness first, then speed.
#
# It uses the GPU machine's own python3 (torch and triton preinstalled, no internet): nothing is
# installed, the repository goes on PYTHONPATH. Each step has a time limit, so the whole run ends
# inside one 10-minute device call even if every step runs out of time; a failing step does not
# stop the later ones. Logs and results go to $OUT (the device tool brings back at most 8 files),
# or to ./gpu-session-out without it.
#
# Steps, in this order (the measurement first: a lent machine's time is short):
#   env       nvidia-smi, python, torch, triton, the device
#   bench     benchmarks/bench_gpu.py: every variant checked, then timed in one run (attention_gpu.md/json,
#             written after every shape)
#   kernels   tests/test_triton_kernel.py on CUDA (compiled kernels, small shapes), each kernel's first
#             autotune candidate (DROPKEY_LAB_TRITON_AUTOTUNE=0: one compilation per mode, not six);
#             and tests/test_timm_interop.py, which runs only where timm imports (it does there)
#   gpu       every `gpu` test (ViT shapes with the autotuner on, SDPA/masks on CUDA, torch.compile)
#   compile   the kernels compiled for sm_90 by the machine's own triton (dropkey.kernels.triton_aot)
#
# Usage, through the device tool's `run` from the repository root:
#   bash benchmarks/gpu_session.sh            (timeout_s 600): every step
#   bash benchmarks/gpu_session.sh bench      only the named steps (say, to rerun one that ran out of time)
# then copy $OUT's attention_gpu.{md,json} into benchmarks/results/ and commit them.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# pytest-xdist spreads the tests (and so Triton's compilations) over processes where it is installed.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

WANTED=" ${*:-env bench kernels gpu compile} "
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2 start status
    shift 2
    [[ $WANTED == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name: exit $status after $(($(date +%s) - start))s$([ "$status" = 124 ] && echo ' (TIME LIMIT)')" | tee -a "$SUMMARY"
}

step env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA DEVICE\")'"
# The measurement first: a lent machine's time is short, and bench_gpu.py checks every variant against
# the reference on the identical mask before timing it. The target shapes first: results are written
# after every shape, so if the time limit strikes, N = 197 and 577 are the ones measured.
step bench 290 "$PY" benchmarks/bench_gpu.py --seq-lens 197,577,65,1024 --output "$OUT"
# -W default: the suite turns warnings into errors (pyproject); on the GPU machine's other torch and
# triton versions a warning is reported in the log instead of failing a test, so the run still measures.
# The gpu step leaves out the bench smoke test: the bench step above is the real run.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W default "${XDIST[@]}")
step kernels 100 env DROPKEY_LAB_TRITON_AUTOTUNE=0 "${PYTEST[@]}" --maxfail=20 tests/test_triton_kernel.py tests/test_timm_interop.py
step gpu 100 "${PYTEST[@]}" -m gpu --deselect tests/test_bench_gpu.py::test_quick_run_on_one_shape
step compile 30 "$PY" -m dropkey.kernels.triton_aot --arch sm_90 --scope smoke --jobs 8
echo "== summary"
cat "$SUMMARY"
