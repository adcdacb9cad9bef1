// The MoE expert GEMMs two ways, for the choice between a per-expert loop and cuBLAS's
// grouped GEMM: E experts of a SwiGLU FFN (gate and up [F,D], down [D,F], bf16, f32 accumulation),
// n_e token rows routed to expert e (a multinomial draw of the M K assignments, so the experts are
// unevenly loaded as in training, or exactly balanced).
//   loop:    what MoeBlock runs, a cuBLASLt GEMM per expert and projection through linear_forward
//            / linear_backward (forward: gate, up, down; backward: their input and weight
//            gradients, the weight gradients accumulated);
//   grouped: cublasGemmGroupedBatchedEx, one call per kind of product over the E experts (forward:
//            gate and up together, then down; backward: down's dX, gate's dX, up's dX added to
//            it). Whether cuBLAS's grouped GEMM takes bf16 operands with an f32 output is probed
//            and printed first; where it does not, the weight gradients (which the model
//            accumulates in f32) stay a per-expert loop in both variants.
// Reported per case: the median time of each (CUDA events, bench_util.h), its TFLOP/s (2 M K F D
// per projection forward, twice that backward), and the time of one dense GEMM set of the same
// FLOPs (M K rows through [F,D]) as the ceiling of either.
// Usage: bench_moe_gemm [--out results.json]
#include <cublas_v2.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "layers/linear/linear.h"
#include "layers/linear/linear_cuda.h"
#include "runtime/check.h"

namespace {

using namespace braid;

#define CUBLAS_OK(call)                                                                    \
  do {                                                                                     \
    const cublasStatus_t st_ = (call);                                                     \
    if (st_ != CUBLAS_STATUS_SUCCESS) BRAID_FAIL(#call, " failed with status ", int(st_)); \
  } while (0)

// One grouped call: C_i = op(A_i) op(B_i), column-major as cuBLAS sees the row-major tensors.
struct Group {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<float> alpha, beta;
  std::vector<const void*> a, b;
  std::vector<void*> c;
  void add(cublasOperation_t opa, cublasOperation_t opb, int mm, int nn, int kk, const void* pa,
           int la, const void* pb, int lb, void* pc, int lc, float be) {
    ta.push_back(opa), tb.push_back(opb), m.push_back(mm), n.push_back(nn), k.push_back(kk);
    a.push_back(pa), lda.push_back(la), b.push_back(pb), ldb.push_back(lb), c.push_back(pc);
    ldc.push_back(lc), alpha.push_back(1.f), beta.push_back(be), size.push_back(1);
  }
};

// The pointer arrays live on the device (cuBLAS reads them there).
struct DeviceGroup {
  Group g;
  void** dev = nullptr;  // a, b, c arrays
  void upload() {
    const size_t n = g.a.size();
    std::vector<const void*> all;
    all.insert(all.end(), g.a.begin(), g.a.end());
    all.insert(all.end(), g.b.begin(), g.b.end());
    for (void* p : g.c) all.push_back(p);
    CUDA_CHECK(cudaMalloc(&dev, 3 * n * sizeof(void*)));
    CUDA_CHECK(cudaMemcpy(dev, all.data(), 3 * n * sizeof(void*), cudaMemcpyHostToDevice));
  }
  void run(cublasHandle_t h) const {
    const size_t n = g.a.size();
    CUBLAS_OK(cublasGemmGroupedBatchedEx(
        h, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(), g.alpha.data(),
        const_cast<const void* const*>(dev), CUDA_R_16BF, g.lda.data(),
        const_cast<const void* const*>(dev + n), CUDA_R_16BF, g.ldb.data(), g.beta.data(),
        dev + 2 * n, CUDA_R_16BF, g.ldc.data(), int(n), g.size.data(), CUBLAS_COMPUTE_32F));
  }
  ~DeviceGroup() { cudaFree(dev); }
};

}  // namespace

int main(int argc, char** argv) {
  auto gpu = make_cuda_backend(0);
  GemmContext gemm(*gpu);
  cublasHandle_t handle;
  CUBLAS_OK(cublasCreate(&handle));
  // Workspace for the grouped path (cuBLAS picks its kernels; 32 MiB as cuBLASLt gets).
  void* cublas_ws = gpu->allocate(size_t(32) << 20);
  CUBLAS_OK(cublasSetWorkspace(handle, cublas_ws, size_t(32) << 20));
  // Probe: one grouped product with bf16 operands and an f32 output.
  cublasStatus_t f32_status;
  {
    bench::DeviceTensors t(*gpu);
    const RandomSpec s{RandomSpec::Kind::uniform, 1, 0, -1.f, 1.f};
    const Tensor a = t.random({64, 64}, DType::bf16, "a", s),
                 c = t.random({64, 64}, DType::f32, "c", s);
    void** dev = nullptr;
    const void* ptrs[3] = {a.data, a.data, c.data};
    CUDA_CHECK(cudaMalloc(&dev, sizeof(ptrs)));
    CUDA_CHECK(cudaMemcpy(dev, ptrs, sizeof(ptrs), cudaMemcpyHostToDevice));
    const cublasOperation_t op = CUBLAS_OP_N;
    const int n = 64, one = 1;
    const float alpha = 1.f, beta = 0.f;
    f32_status = cublasGemmGroupedBatchedEx(
        handle, &op, &op, &n, &n, &n, &alpha, const_cast<const void* const*>(dev), CUDA_R_16BF, &n,
        const_cast<const void* const*>(dev + 1), CUDA_R_16BF, &n, &beta, dev + 2, CUDA_R_32F, &n, 1,
        &one, CUBLAS_COMPUTE_32F);
    CUDA_CHECK(cudaDeviceSynchronize());
    cudaFree(dev);
  }
  std::printf("grouped GEMM, bf16 operands, f32 output: cuBLAS status %d (%s)\n", int(f32_status),
              f32_status == CUBLAS_STATUS_SUCCESS ? "supported" : "not supported");
  std::string json = "{\"bench\": \"moe_gemm\", \"grouped_f32_output_status\": " +
                     std::to_string(int(f32_status)) + ", \"cases\": [";
  std::printf("%-34s %10s %10s %10s %9s %9s\n", "case (E, K, M tokens, D, F)", "loop ms",
              "grouped ms", "dense ms", "loop TF/s", "grp TF/s");
  struct Case {
    int e, k, m, d, f;
    bool balanced;
  };
  for (const Case c : {Case{8, 2, 8192, 2048, 2048, false}, Case{8, 2, 8192, 2048, 2048, true},
                       Case{8, 2, 16384, 2048, 2048, false}, Case{64, 8, 8192, 2048, 512, false},
                       Case{16, 2, 4096, 4096, 5632, false}}) {
    // Rows per expert.
    std::vector<int> rows(c.e, c.m * c.k / c.e);
    if (!c.balanced) {
      std::mt19937 g(7);
      std::uniform_int_distribution<int> pick(0, c.e - 1);
      std::fill(rows.begin(), rows.end(), 0);
      for (int i = 0; i < c.m * c.k; ++i) ++rows[pick(g)];
    }
    const int64_t total = int64_t(c.m) * c.k;
    bench::DeviceTensors t(*gpu);
    const RandomSpec spec{RandomSpec::Kind::uniform, 1, 0, -0.05f, 0.05f};
    const Tensor x = t.random({total, c.d}, DType::bf16, "x", spec),
                 ga = t.random({total, c.f}, DType::bf16, "gate_act", spec),
                 ua = t.random({total, c.f}, DType::bf16, "up_act", spec),
                 he = t.random({total, c.f}, DType::bf16, "hidden", spec),
                 out = t.random({total, c.d}, DType::bf16, "out", spec),
                 dout = t.random({total, c.d}, DType::bf16, "dout", spec),
                 dh = t.random({total, c.f}, DType::bf16, "dhidden", spec),
                 dx = t.random({total, c.d}, DType::bf16, "dx", spec);
    std::vector<Tensor> wg, wu, wd, gwg, gwu, gwd;
    for (int e = 0; e < c.e; ++e) {
      wg.push_back(t.random({c.f, c.d}, DType::bf16, "w_gate", spec));
      wu.push_back(t.random({c.f, c.d}, DType::bf16, "w_up", spec));
      wd.push_back(t.random({c.d, c.f}, DType::bf16, "w_down", spec));
      gwg.push_back(t.random({c.f, c.d}, DType::f32, "dw_gate", spec));
      gwu.push_back(t.random({c.f, c.d}, DType::f32, "dw_up", spec));
      gwd.push_back(t.random({c.d, c.f}, DType::f32, "dw_down", spec));
    }
    auto seg = [&](const Tensor& a, int e) {
      int64_t r0 = 0;
      for (int j = 0; j < e; ++j) r0 += rows[j];
      return a.slice(0, r0, rows[e]);
    };
    auto loop_fwd = [&] {
      for (int e = 0; e < c.e; ++e) {
        if (rows[e] == 0) continue;
        linear_forward(seg(x, e), wg[e], nullptr, seg(ga, e), &gemm);
        linear_forward(seg(x, e), wu[e], nullptr, seg(ua, e), &gemm);
        linear_forward(seg(he, e), wd[e], nullptr, seg(out, e), &gemm);
      }
    };
    auto loop_bwd = [&] {
      for (int e = 0; e < c.e; ++e) {
        if (rows[e] == 0) continue;
        const Tensor dhe = seg(dh, e), dxe = seg(dx, e);
        linear_backward(seg(he, e), wd[e], seg(dout, e), &dhe, gwd[e], nullptr, &gemm);
        linear_backward(seg(x, e), wg[e], seg(ga, e), &dxe, gwg[e], nullptr, &gemm);
        linear_backward(seg(x, e), wu[e], seg(ua, e), &dxe, gwu[e], nullptr, &gemm, true);
      }
    };
    // Grouped: row-major Y[n,F] = X[n,D] W[F,D]^T is column-major Y^T = W^T X^T:
    //   (m, n, k) = (F, n_e, D), A = W (op T, ld D), B = X (op N, ld D), C ld F.
    auto bf = [](const Tensor& a) { return a.data; };
    DeviceGroup up_gate, down, d_down_x, d_gu_x;
    for (int e = 0; e < c.e; ++e) {
      const int n = rows[e];
      if (n == 0) continue;
      const Tensor xe = seg(x, e), gae = seg(ga, e), uae = seg(ua, e), hee = seg(he, e),
                   oe = seg(out, e), doe = seg(dout, e), dhe = seg(dh, e), dxe = seg(dx, e);
      up_gate.g.add(CUBLAS_OP_T, CUBLAS_OP_N, c.f, n, c.d, bf(wg[e]), c.d, bf(xe), c.d, bf(gae),
                    c.f, 0.f);
      up_gate.g.add(CUBLAS_OP_T, CUBLAS_OP_N, c.f, n, c.d, bf(wu[e]), c.d, bf(xe), c.d, bf(uae),
                    c.f, 0.f);
      down.g.add(CUBLAS_OP_T, CUBLAS_OP_N, c.d, n, c.f, bf(wd[e]), c.f, bf(hee), c.f, bf(oe), c.d,
                 0.f);
      // dH[n,F] = dOut[n,D] Wd[D,F]: column-major dH^T = Wd^T dOut^T: (F, n, D), A = Wd (op N,
      // ld F), B = dOut (op N, ld D).
      d_down_x.g.add(CUBLAS_OP_N, CUBLAS_OP_N, c.f, n, c.d, bf(wd[e]), c.f, bf(doe), c.d, bf(dhe),
                     c.f, 0.f);
      // dX[n,D] = dG Wg + dU Wu (two products into one output: the second adds).
      d_gu_x.g.add(CUBLAS_OP_N, CUBLAS_OP_N, c.d, n, c.f, bf(wg[e]), c.d, bf(gae), c.f, bf(dxe),
                   c.d, 0.f);
    }
    // The up projection's dX adds into the gate's: a second grouped call (beta 1).
    DeviceGroup d_u_x;
    for (int e = 0; e < c.e; ++e)
      if (rows[e] > 0)
        d_u_x.g.add(CUBLAS_OP_N, CUBLAS_OP_N, c.d, rows[e], c.f, bf(wu[e]), c.d, bf(seg(ua, e)),
                    c.f, bf(seg(dx, e)), c.d, 1.f);
    for (DeviceGroup* g : {&up_gate, &down, &d_down_x, &d_gu_x, &d_u_x}) g->upload();
    auto weight_grads = [&] {  // f32 dW, per expert (both variants)
      for (int e = 0; e < c.e; ++e) {
        if (rows[e] == 0) continue;
        linear_backward(seg(he, e), wd[e], seg(dout, e), nullptr, gwd[e], nullptr, &gemm);
        linear_backward(seg(x, e), wg[e], seg(ga, e), nullptr, gwg[e], nullptr, &gemm);
        linear_backward(seg(x, e), wu[e], seg(ua, e), nullptr, gwu[e], nullptr, &gemm);
      }
    };
    auto grouped_fwd = [&] {
      up_gate.run(handle);
      down.run(handle);
    };
    auto grouped_bwd = [&] {
      d_down_x.run(handle);
      d_gu_x.run(handle);
      d_u_x.run(handle);
      weight_grads();
    };
    // The ceiling: the same products as one GEMM per projection over all M K rows (expert 0's
    // weights for every row).
    auto dense = [&] {
      linear_forward(x, wg[0], nullptr, ga, &gemm);
      linear_forward(x, wu[0], nullptr, ua, &gemm);
      linear_forward(he, wd[0], nullptr, out, &gemm);
      linear_backward(he, wd[0], dout, &dh, gwd[0], nullptr, &gemm);
      linear_backward(x, wg[0], ga, &dx, gwg[0], nullptr, &gemm);
      linear_backward(x, wu[0], ua, &dx, gwu[0], nullptr, &gemm, true);
    };
    const double loop_ms = bench::median_ms([&] {
      loop_fwd();
      loop_bwd();
    });
    const double grouped_ms = bench::median_ms([&] {
      grouped_fwd();
      grouped_bwd();
    });
    const double fwd_loop = bench::median_ms(loop_fwd), fwd_grouped = bench::median_ms(grouped_fwd);
    const double dense_ms = bench::median_ms(dense);
    const double flops = 3 * 2.0 * double(total) * c.d * c.f * 3;  // fwd + bwd (3x fwd)
    char name[64];
    std::snprintf(name, sizeof(name), "%d, %d, %d, %d, %d%s", c.e, c.k, c.m, c.d, c.f,
                  c.balanced ? " balanced" : "");
    std::printf(
        "%-34s %10.3f %10.3f %10.3f %9.1f %9.1f   (forward only: loop %.3f, grouped %.3f)\n", name,
        loop_ms, grouped_ms, dense_ms, flops / loop_ms / 1e9, flops / grouped_ms / 1e9, fwd_loop,
        fwd_grouped);
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"experts\": %d, \"top_k\": %d, \"tokens\": %d, \"d\": %d, \"f\": %d, "
                  "\"balanced\": %s, \"fwd_bwd_ms\": {\"loop\": %.4f, \"grouped\": %.4f, "
                  "\"dense\": %.4f}, \"fwd_ms\": {\"loop\": %.4f, \"grouped\": %.4f}}",
                  json.back() == '[' ? "" : ", ", c.e, c.k, c.m, c.d, c.f,
                  c.balanced ? "true" : "false", loop_ms, grouped_ms, dense_ms, fwd_loop,
                  fwd_grouped);
    json += buf;
  }
  json += "]}";
  gpu->release(cublas_ws);
  cublasDestroy(handle);
  return bench::write_text(bench::out_path(argc, argv), json) ? 0 : 1;
}
