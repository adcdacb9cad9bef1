// The GPU linear: cuBLASLt GEMMs on row-major tensors, written as column-major products of the
// transposes (a row-major [R,C] matrix is a column-major [C,R] one):
//   y  [M,O] = x W^T   ->  y^T  = W x^T          (op(W view) = T, m = O, n = M, k = I)
//   dx [M,I] = dy W    ->  dx^T = W^T dy^T       (no transposes, m = I, n = M, k = O)
//   dW [O,I] += dy^T x ->  dW^T += x^T dy        (op(dy view) = T, m = I, n = O, k = M, beta 1)
// f32 accumulation (CUBLAS_COMPUTE_32F); the bias by the forward GEMM's epilogue; db by the
// deterministic column sums of linear_kernels.cu.
#include "layers/linear/linear_cuda.h"

#include "layers/common/op_common.h"
#include "layers/linear/linear.h"

#if defined(BRAID_WITH_CUDA)
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"

#define CUBLAS_CHECK(call)                                                  \
  do {                                                                      \
    const cublasStatus_t braid_cublas_status_ = (call);                     \
    if (braid_cublas_status_ != CUBLAS_STATUS_SUCCESS)                      \
      ::braid::detail::fail(__FILE__, __LINE__, #call, ": ",                \
                            cublasLtGetStatusString(braid_cublas_status_)); \
  } while (0)
#endif

namespace braid {

// Column sums of dy [M,O] added to db [O] (linear_kernels.cu); partials: ceil(M/256) x O floats.
void linear_bias_grad_cuda(const void* dy, void* db, int64_t m, int64_t o, bool bf16,
                           float* partials, void* stream);

#if defined(BRAID_WITH_CUDA)
namespace {

cudaDataType_t cuda_type(DType t) {
  return t == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
}

// C (col-major m x n, ld ldc) = alpha op(A) op(B) + beta C, A (lda), B (ldb) col-major views;
// A and B of dtype t, C of dtype ct (t, or f32).
void run_gemm(const GemmContext& g, DType t, DType ct, bool trans_a, bool trans_b, int64_t m,
              int64_t n, int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, void* c,
              int64_t ldc, float beta, const void* bias) {
  cublasLtHandle_t h = static_cast<cublasLtHandle_t>(g.handle());
  cublasLtMatmulDesc_t desc = nullptr;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                          tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (bias) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
    const cudaDataType_t bt = cuda_type(t);
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
  }
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  const cudaDataType_t dt = cuda_type(t);
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, dt, trans_a ? k : m, trans_a ? m : k, lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, dt, trans_b ? n : k, trans_b ? k : n, ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, cuda_type(ct), m, n, ldc));
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws = g.workspace_bytes();
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, &result, &found));
  BRAID_CHECK(found > 0, "linear (CUDA): cuBLASLt has no algorithm for a ", m, " x ", n, " x ", k,
              " ", dtype_name(t), " -> ", dtype_name(ct), " product");
  const float alpha = 1.f;
  CUBLAS_CHECK(cublasLtMatmul(h, desc, &alpha, a, la, b, lb, &beta, c, lc, c, lc, &result.algo,
                              g.workspace(), g.workspace_bytes(),
                              static_cast<cudaStream_t>(g.stream())));
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la), cublasLtMatrixLayoutDestroy(lb), cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
}

const GemmContext& context(const GemmContext* g) {
  BRAID_CHECK(g, "linear: GPU tensors need a GemmContext (cuBLASLt handle and workspace)");
  return *g;
}

}  // namespace

GemmContext::GemmContext(Backend& backend, size_t workspace_bytes, void* stream)
    : backend_(backend), bytes_(workspace_bytes), stream_(stream) {
  BRAID_CHECK(backend.device() == Device::cuda, "GemmContext: needs a CUDA backend");
  cublasLtHandle_t h = nullptr;
  CUBLAS_CHECK(cublasLtCreate(&h));
  handle_ = h;
  workspace_ = backend.allocate(bytes_);
}

GemmContext::~GemmContext() {
  backend_.release(workspace_);
  cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

void linear_forward_gpu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                        const GemmContext* gemm) {
  const GemmContext& g = context(gemm);
  require_gpu("linear", {&x, &w, bias, &y});
  BRAID_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f32,
              "linear (CUDA): bf16 or f32 tensors, got ", x.describe());
  const int64_t m = x.size(0), in = x.size(1), out = w.size(0);
  run_gemm(g, x.dtype, y.dtype, true, false, out, m, in, w.data, in, x.data, in, y.data, out, 0.f,
           bias ? bias->data : nullptr);
}

void linear_backward_gpu(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor* dx,
                         const Tensor& dw, const Tensor* dbias, const GemmContext* gemm,
                         bool accumulate_dx) {
  const GemmContext& g = context(gemm);
  require_gpu("linear", {&x, &w, &dy, dx, &dw, dbias});
  const int64_t m = x.size(0), in = x.size(1), out = w.size(0);
  if (dx)
    run_gemm(g, x.dtype, x.dtype, false, false, in, m, out, w.data, in, dy.data, out, dx->data, in,
             accumulate_dx ? 1.f : 0.f, nullptr);
  run_gemm(g, x.dtype, dw.dtype, false, true, in, out, m, x.data, in, dy.data, out, dw.data, in,
           1.f, nullptr);
  if (dbias) {
    const int64_t need = (m + 255) / 256 * out * int64_t(sizeof(float));
    BRAID_CHECK(need <= int64_t(g.workspace_bytes()), "linear (CUDA): the bias gradient needs ",
                need, " bytes of the GemmContext's workspace, it has ", g.workspace_bytes());
    linear_bias_grad_cuda(dy.data, dbias->data, m, out, x.dtype == DType::bf16,
                          static_cast<float*>(g.workspace()), g.stream());
  }
}

#else

GemmContext::GemmContext(Backend& backend, size_t, void*) : backend_(backend) {
  BRAID_FAIL("GemmContext: this build has no CUDA (-DBRAID_CUDA=ON)");
}
GemmContext::~GemmContext() = default;

void linear_forward_gpu(const Tensor&, const Tensor&, const Tensor*, const Tensor&,
                        const GemmContext*) {
  BRAID_FAIL("linear: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
}
void linear_backward_gpu(const Tensor&, const Tensor&, const Tensor&, const Tensor*, const Tensor&,
                         const Tensor*, const GemmContext*, bool) {
  BRAID_FAIL("linear: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
}

#endif

}  // namespace braid
