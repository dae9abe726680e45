#!/bin/bash
# The GPU check on a lent GPU machine (tools/gpu/check.py's docstring says what it runs).
#
#   bash tools/gpu/check.sh stage        copy the carried .gpu_run*/ parts to $GPU_BUNDLE, nothing else
#   bash tools/gpu/check.sh [ARGS...]    the same; then, once every part is there, unpack them and run
#                                        tools/gpu/check.py --data-root $GPU_BUNDLE/facades ARGS...
#
# The parts come from `tools/gpu/bundle.sh` (here, once; it prints the `run` calls, one per part, back to
# back). Without any parts it runs check.py as it is. The bundle's packages go on PYTHONPATH only where
# `import ray, faiss, lpips, zuko` fails or faiss has no GPU index. Its cuBLAS stand-in (bundle.sh) finds
# CUDA 13's libcublas.so.13 loaded with torch, or at $STEP_RAY_CUBLAS13, set here from torch's packages.
# With $OUT set (the device machine) the console output goes to $OUT/gpu_check_console.txt too.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${GPU_BUNDLE:-/tmp/gpu_bundle}
PY=${PYTHON:-python3}
# shellcheck source=tools/gpu/bundle.sh
source tools/gpu/bundle.sh
ARGS=("$@")
gpu_bundle_stage .gpu_run "$BUNDLE" "${1:-}"
[ "${1:-}" = stage ] && exit 0
gpu_bundle_unpack "$BUNDLE" "bash tools/gpu/check.sh stage"; rc=$?
[ "$rc" = 3 ] && exit 3
if [ "$rc" = 0 ]; then
  ARGS=(--data-root "$BUNDLE/facades" "${ARGS[@]}")
  PYTHON=$PY gpu_bundle_site "$BUNDLE" 'import ray, faiss, lpips, zuko; faiss.StandardGpuResources'
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
"$PY" tools/gpu/check.py "${ARGS[@]}" 2>&1 | tee ${OUT:+"$OUT/gpu_check_console.txt"}
exit "${PIPESTATUS[0]}"
