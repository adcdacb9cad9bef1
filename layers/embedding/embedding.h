// Embedding lookup: y[b,t,:] = W[tok[b,t], :].
//   tok [B,T] i32, W [V,D], y [B,T,D].
//   dW[v,:] += sum over (b,t) with tok[b,t] = v of dy[b,t,:]   (+=, in token order)
// Token ids outside [0, V) are errors naming the position (CPU). On the GPU (tokens i32, W, y, dy,
// dW bf16 or f32 on the device; dW may be f32 with bf16 dy, for mixed precision) the ids are not
// read back to the host to be checked: the trainer's data loader checks them against the
// vocabulary; an id outside W's rows gives a zero row and adds nothing. The GPU backward is
// deterministic (a stable sort by row, then each row's dy rows added in position order) and takes a
// workspace of embedding_workspace_bytes bytes (u8). Vocabulary-parallel form (vocab_size > 0): W
// holds rows [vocab_start, vocab_start + rows) of a vocabulary of vocab_size; tokens outside those
// rows give zero rows in y (the sum over the ranks is the lookup) and add nothing to dW.
#pragma once

#include "runtime/tensor.h"

namespace braid {

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y,
                       int64_t vocab_start = 0, int64_t vocab_size = 0, void* stream = nullptr);
// Bytes of the backward's workspace for `rows` rows of W: 0 on the CPU.
int64_t embedding_workspace_bytes(const Tensor& tokens, int64_t rows);
void embedding_backward(const Tensor& tokens, const Tensor& dy, const Tensor& dweight,
                        int64_t vocab_start = 0, int64_t vocab_size = 0,
                        const Tensor* workspace = nullptr, void* stream = nullptr);

// The CUDA side (embedding_kernels.cu), after the checks: n tokens, rows of W from v0, width d.
int64_t embedding_backward_workspace_bytes_cuda(int64_t n, int64_t rows);
void embedding_forward_cuda(const int32_t* tokens, const void* w, void* y, int64_t n, int64_t d,
                            int64_t v0, int64_t rows, bool bf16, void* stream);
void embedding_backward_cuda(const int32_t* tokens, const void* dy, void* dw, int64_t n, int64_t d,
                             int64_t v0, int64_t rows, bool dy_bf16, bool dw_bf16, void* workspace,
                             void* stream);

}  // namespace braid
