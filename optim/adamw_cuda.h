// The CUDA side of AdamW (adamw.cpp): one launch updates every parameter (a table of chunks of
// up to kAdamChunk elements of the parameters' f32 master weights, moments and gradients), and
// the global gradient norm sums per-chunk partials in a fixed order (deterministic).
#pragma once

#include <cstdint>

namespace braid {

constexpr int64_t kAdamChunk = 65536;

// One chunk of one parameter: elements [begin, begin + count) of its tensors.
struct AdamTask {
  void* value = nullptr;       // the parameter (bf16 or f32, as bf16 says; f32: may be the master)
  void* compute = nullptr;     // its bf16 compute copy, rounded from the master (or null)
  const void* grad = nullptr;  // its gradient (the same dtype)
  float *master = nullptr, *m = nullptr, *v = nullptr;
  int64_t begin = 0, count = 0;
  int decay = 0;  // decoupled weight decay applies
  int bf16 = 0;
  // Which of the norm's sums its squares join (total[norm_group]); 2: none (a mirror, whose
  // original is counted where it lives).
  int norm_group = 0;
};

struct AdamStep {
  float clip = 1.f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, step_size = 0.f, inv_sqrt_bc2 = 1.f;
  float decay = 1.f;  // 1 - lr weight_decay, for the parameters that decay
};

// The tasks are in device memory. master <- value (once, at set-up).
void adamw_init_master_cuda(const AdamTask* tasks, int n_tasks, void* stream);
// partials[t] = sum of squares of task t's gradient (f64); then total[g] = the sum, in task order,
// of the partials of the tasks of norm group g (g = 0, 1; total holds 2; group 2 is left out).
void adamw_grad_sq_cuda(const AdamTask* tasks, int n_tasks, double* partials, double* total,
                        void* stream);
void adamw_step_cuda(const AdamTask* tasks, int n_tasks, const AdamStep& s, void* stream);

}  // namespace braid
