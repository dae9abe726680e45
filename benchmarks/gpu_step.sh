#!/bin/bash
# The GPU check of issue 21 on a lent GPU machine (see benchmarks/gpu_step.py's docstring).
#
#   bash benchmarks/gpu_step.sh stage        copy the carried .gpu_stage*/ parts to $GPU_BUNDLE, nothing else
#   bash benchmarks/gpu_step.sh [ARGS...]    the same; then, once every part is there, unpack them and run
#                                            benchmarks/gpu_step.py --data-root $GPU_BUNDLE/facades ARGS...
#
# The parts come from benchmarks/gpu_step_bundle.sh (= `benchmarks/gpu_bundle.sh step`; one `run` call
# each, back to back, so the machine is still warm and /tmp still holds the earlier parts). Without any
# parts it runs gpu_step.py as it is (data from --data-root or .gpu_data/facades). The packages of the bundle go on PYTHONPATH only where
# `import ray, faiss, lpips, zuko` fails, so on a machine that has them this runs the same way.
# With $OUT set (the device machine) the console output goes to $OUT/gpu_step_console.txt too.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-/tmp/gpu_bundle}
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_bundle.sh
source benchmarks/gpu_bundle.sh   # the staging and unpacking benchmarks/gpu.sh shares
gpu_bundle_stage .gpu_stage "$BUNDLE" "${1:-}"
[ "${1:-}" = stage ] && exit 0

ARGS=("$@")
gpu_bundle_unpack "$BUNDLE" "bash benchmarks/gpu_step.sh stage"; rc=$?
[ "$rc" = 3 ] && exit 3
if [ "$rc" = 0 ]; then
  ARGS=(--data-root "$BUNDLE/facades" "${ARGS[@]}")
  PYTHON=$PY gpu_bundle_site "$BUNDLE" 'import ray, faiss, lpips, zuko'
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" benchmarks/gpu_step.py "${ARGS[@]}" 2>&1 | tee ${OUT:+"$OUT/gpu_step_console.txt"}
exit "${PIPESTATUS[0]}"
