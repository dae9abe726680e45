#!/bin/bash
# The GPU run of issue 22 on a lent GPU machine (see benchmarks/gpu.py's docstring).
#
#   bash benchmarks/gpu.sh stage        copy the carried .gpu_run*/ parts to $GPU_BUNDLE, nothing else
#   bash benchmarks/gpu.sh [ARGS...]    the same; then, once every part is there, unpack them and run
#                                       benchmarks/gpu.py --data-root $GPU_BUNDLE/facades ARGS...
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --dry-run    here: every part on the CPU at tiny sizes, no bundle
#
# The parts come from `benchmarks/gpu_bundle.sh run` (one `run` call each, back to back, so the machine is
# still warm and /tmp still holds the earlier parts). Without any parts it runs gpu.py as it is. The
# packages of the bundle go on PYTHONPATH only where `import ray, faiss, lpips, zuko` fails or faiss has
# no GPU index. faiss-gpu-cu12 there calls CUDA 13's cuBLAS through the bundle's stand-in libcublas.so.12,
# which finds libcublas.so.13 loaded with torch or at $STEP_RAY_CUBLAS13 (set here from torch's packages).
# With $OUT set (the device machine) the console output goes to $OUT/gpu_console.txt too.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-/tmp/gpu_run_bundle}
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_bundle.sh
source benchmarks/gpu_bundle.sh
ARGS=("$@")
rc=1
if [ "${1:-}" != --dry-run ]; then   # the dry run (here, the CPU) uses no bundle
  gpu_bundle_stage .gpu_run "$BUNDLE" "${1:-}"
  [ "${1:-}" = stage ] && exit 0
  gpu_bundle_unpack "$BUNDLE" "bash benchmarks/gpu.sh stage"; rc=$?
fi
[ "$rc" = 3 ] && exit 3
if [ "$rc" = 0 ]; then
  ARGS=(--data-root "$BUNDLE/facades" "${ARGS[@]}")
  PYTHON=$PY gpu_bundle_site "$BUNDLE" 'import ray, faiss, lpips, zuko; faiss.StandardGpuResources'
  # benchmarks/generator_step.py reads facades from ../shared/data/facades, which does not travel
  if [ ! -d ../shared/data/facades ]; then mkdir -p ../shared/data && ln -sfn "$BUNDLE/facades" ../shared/data/facades; fi
fi
if [ -z "${STEP_RAY_CUBLAS13:-}" ]; then
  STEP_RAY_CUBLAS13=$("$PY" -c 'import glob, site, sys
for d in site.getsitepackages() + sys.path:
    for f in glob.glob(d + "/nvidia/cu13/lib/libcublas.so.13") + glob.glob(d + "/nvidia/cublas/lib/libcublas.so.13"):
        print(f); raise SystemExit' 2>/dev/null)
  export STEP_RAY_CUBLAS13
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" benchmarks/gpu.py "${ARGS[@]}" 2>&1 | tee ${OUT:+"$OUT/gpu_console.txt"}
exit "${PIPESTATUS[0]}"
