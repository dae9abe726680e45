#!/bin/bash
# The GPU check of issue 21 on a lent GPU machine (see benchmarks/gpu_step.py's docstring).
#
#   bash benchmarks/gpu_step.sh stage        copy the carried .gpu_stage*/ parts to $GPU_BUNDLE, nothing else
#   bash benchmarks/gpu_step.sh [ARGS...]    the same; then, once every part is there, unpack them and run
#                                            benchmarks/gpu_step.py --data-root $GPU_BUNDLE/facades ARGS...
#
# The parts come from benchmarks/gpu_step_bundle.sh (one `run` call each, back to back, so the machine is
# still warm and /tmp still holds the earlier parts). Without any parts it runs gpu_step.py as it is
# (data from --data-root or .gpu_data/facades). The packages of the bundle go on PYTHONPATH only where
# `import ray, faiss, lpips, zuko` fails, so on a machine that has them this runs the same way.
# With $OUT set (the device machine) the console output goes to $OUT/gpu_step_console.txt too.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-/tmp/gpu_bundle}
PY=${PYTHON:-python3}
shopt -s nullglob
staged=(.gpu_stage*/bundle.part.*)
if [ ! -f "$BUNDLE/.unpacked" ] && { [ ${#staged[@]} -gt 0 ] || [ "${1:-}" = stage ]; }; then
  mkdir -p "$BUNDLE"
  for f in .gpu_stage*/*; do cp -f "$f" "$BUNDLE/"; done
  echo "[gpu_step.sh] parts in $BUNDLE:"; ls -la "$BUNDLE"
fi
[ "${1:-}" = stage ] && exit 0

ARGS=("$@")
if [ -f "$BUNDLE/bundle.sha256" ]; then
  if [ ! -f "$BUNDLE/.unpacked" ]; then
    (cd "$BUNDLE" && sha256sum -c --quiet bundle.sha256) || {
      echo "[gpu_step.sh] parts missing or damaged in $BUNDLE (a fresh machine loses them): run every" \
           "'bash benchmarks/gpu_step.sh stage' call again, back to back, then this one" >&2; exit 3; }
    t=$(date +%s)
    cat "$BUNDLE"/bundle.part.* | tar -x -C "$BUNDLE" && tar -xJf "$BUNDLE/gpu_site.tar.xz" -C "$BUNDLE" \
      && rm -f "$BUNDLE"/bundle.part.* "$BUNDLE/gpu_site.tar.xz" && touch "$BUNDLE/.unpacked" || exit 3
    echo "[gpu_step.sh] unpacked in $(( $(date +%s) - t ))s"
  fi
  ARGS=(--data-root "$BUNDLE/facades" "${ARGS[@]}")
  if ! "$PY" -c 'import ray, faiss, lpips, zuko' 2>/dev/null; then
    export PYTHONPATH="$BUNDLE/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_step.sh] packages from $BUNDLE/gpu_site"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" benchmarks/gpu_step.py "${ARGS[@]}" 2>&1 | tee ${OUT:+"$OUT/gpu_step_console.txt"}
exit "${PIPESTATUS[0]}"
