// Mixture-of-Experts router (Mixtral / Jamba softmax top-k; DeepSeek-V3 / Nemotron-H sigmoid
// scores with a balancing bias), with the Switch/Megatron auxiliary loss and the z-loss.
//   scores s[m,e] = softmax_e(logits[m,:])  or  sigmoid(logits[m,e])
//   choice: the K experts with the largest s[m,e] + bias[e] (bias only steers the choice; ties go
//           to the lower index)
//   weight w[m,k] = s[m,e_k], divided by sum_k s[m,e_k] when normalize_topk
//   capacity: cap = ceil(capacity_factor * M * K / E); assignments are taken in (m, k) order and
//             those beyond cap are dropped (slot -1); capacity_factor <= 0 is dropless (cap = M).
//   aux  = E / (K M^2) * sum_e count_e * sum_m pn[m,e],  pn = s / sum_e s (= s for softmax),
//          count_e = assignments choosing e before dropping (treated as constant)
//   zloss = mean_m logsumexp_e(logits[m,:])^2
//   logits, scores [M,E]; bias, counts [E]; expert, slot [M,K] i32; weight [M,K].
// Backward: dlogits (=) from dweight [M,K] and the multipliers aux_grad, z_grad (the derivative
// of the total loss with respect to aux and zloss, coefficients included).
// On the GPU (every tensor on the device; logits, scores, weight, bias, dweight, dlogits f32) the
// same arithmetic runs in f32: a thread per token chooses its experts, a block per expert numbers
// its assignments in (m, k) order (slots, counts), and the two loss sums are per-block f64
// partials added in order (workspace), read back to the host with one small copy and a wait, or
// left on the device (loss_sums) for router_losses to read later: the forward then does not wait.
// Deterministic: no atomics.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

enum class RouterScore { softmax, sigmoid };

struct RouterConfig {
  int64_t top_k = 2;
  RouterScore score = RouterScore::softmax;
  bool normalize_topk = false;
  double capacity_factor = 0.0;  // <= 0: dropless
};

struct RouterOutputs {
  const Tensor* scores = nullptr;     // [M,E]
  const Tensor* expert = nullptr;     // [M,K] i32 chosen expert
  const Tensor* slot = nullptr;       // [M,K] i32 row in that expert's buffer, -1 when dropped
  const Tensor* weight = nullptr;     // [M,K]
  const Tensor* counts = nullptr;     // [E] i32 assignments per expert before dropping
  const Tensor* workspace = nullptr;  // GPU: f64 [router_workspace_elems()] for the loss sums
  const Tensor* loss_sums = nullptr;  // GPU, optional: f64 [2], the sums kept here, not read back
};

int64_t router_workspace_elems();

struct RouterLosses {
  double aux = 0;
  double z = 0;
};

// Rows per expert buffer: the capacity, or M when dropless.
int64_t router_capacity(const RouterConfig& cfg, int64_t tokens, int64_t experts);

// Returns the losses; on the GPU with out.loss_sums, zeros (router_losses reads them later).
RouterLosses router_forward(const Tensor& logits, const Tensor* bias, const RouterConfig& cfg,
                            const RouterOutputs& out);
// The losses of a forward of M tokens, E experts, top-K from its loss_sums (one copy and a wait).
RouterLosses router_losses(const Tensor& loss_sums, int64_t m, int64_t e, int64_t k);
// Balancing-bias rule (DeepSeek-V3 auxiliary-loss-free balancing), applied after an optimizer
// step: bias[e] += rate * sign(mean_j counts[j] - counts[e]); counts [E] i32 are the step's
// assignments per expert, zeroed afterwards.
void router_update_bias(const Tensor& bias, const Tensor& counts, double rate);
// acc[e] += counts[e] (i32).
void router_accumulate_counts(const Tensor& acc, const Tensor& counts);

void router_backward(const Tensor& logits, const RouterConfig& cfg, const RouterOutputs& saved,
                     const Tensor& dweight, double aux_grad, double z_grad, const Tensor& dlogits);

// The CUDA side (moe_router_kernels.cu), after the checks. sums: the last 2 of the workspace.
int64_t router_loss_workspace_elems_cuda();
void router_forward_cuda(const float* logits, const float* bias, int64_t m, int e, int k,
                         int64_t cap, bool sigmoid_scores, bool normalize, float* scores,
                         int32_t* expert, int32_t* slot, float* weight, int32_t* counts,
                         double* workspace, double* sums, void* stream);
void router_backward_cuda(const float* logits, const float* scores, const int32_t* expert,
                          const int32_t* counts, const float* dweight, int64_t m, int e, int k,
                          bool sigmoid_scores, bool normalize, float aux_c, float z_grad,
                          float* dlogits, void* stream);
void router_update_bias_cuda(float* bias, int32_t* counts, int e, float rate, void* stream);
void router_accumulate_counts_cuda(int32_t* acc, const int32_t* counts, int e, void* stream);

}  // namespace braid
