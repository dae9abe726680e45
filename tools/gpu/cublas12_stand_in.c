/* libcublas.so.12 for faiss-gpu-cu12 on a CUDA-13 machine: forwards the 8 functions libfaiss calls to
   libcublas.so.13, whose prototypes and enum values for them are the same. Built by tools/gpu/bundle.sh. */
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
    if (!lib) fprintf(stderr, "[cublas stand-in] libcublas.so.13 not found (%s): import torch first or set STEP_RAY_CUBLAS13\n", dlerror());
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
