#include "layers/causal_conv1d/causal_conv1d_cp.h"

#include "layers/causal_conv1d/causal_conv1d_cuda.h"
#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

ConvHalo check_cp(const Conv1dInputs& in) {
  BRAID_CHECK(in.x && in.w && in.x->ndim == 3 && in.w->ndim == 2,
              "causal_conv1d (context parallel): expects x [B,T,C] and w [C,W]");
  ConvHalo h;
  h.batch = int(in.x->size(0)), h.seqlen = int(in.x->size(1)), h.channels = int(in.x->size(2));
  h.halo = int(in.w->size(1) - 1), h.bf16 = in.x->dtype == DType::bf16;
  BRAID_REQUIRE(h.seqlen >= h.halo, "causal_conv1d (context parallel): a shard of ", h.seqlen,
                " tokens is shorter than the conv's ", h.halo, "-token halo");
  BRAID_CHECK(in.x->is_contiguous(), "causal_conv1d (context parallel): ", in.x->describe(),
              " must be contiguous");
  if (in.seq_idx) h.seq_idx = in.seq_idx->ptr<int32_t>();
  return h;
}

// halo [B,C,W-1] = the last W-1 inputs of x's rows in the document of the row's last token (0
// elsewhere), or (add) halo added onto dx at those inputs.
template <bool kAdd>
void move_halo(const ConvHalo& p, const Tensor& x_or_dx, const Tensor& halo, void* stream) {
  BRAID_CHECK(x_or_dx.is_contiguous() && x_or_dx.dtype == halo.dtype,
              "causal_conv1d (context parallel): ", x_or_dx.describe(),
              " must be contiguous and of the inputs' dtype");
  if (x_or_dx.device == Device::cuda) {
#if defined(BRAID_WITH_CUDA)
    causal_conv1d_halo_cuda(p, kAdd, x_or_dx.data, halo.data, stream);
    return;
#else
    BRAID_FAIL("causal_conv1d (context parallel): GPU tensors but this build has no CUDA");
#endif
  }
  (void)stream;
  dispatch_float(x_or_dx.dtype, "causal_conv1d (context parallel)", [&]<typename T>() {
    T *x = x_or_dx.ptr<T>(), *h = halo.ptr<T>();
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t j = 0; j < p.halo; ++j) {
        const int64_t row = b * p.seqlen, s = p.seqlen - p.halo + j;
        const bool same = !p.seq_idx || p.seq_idx[row + s] == p.seq_idx[row + p.seqlen - 1];
        for (int64_t c = 0; c < p.channels; ++c) {
          T &hv = h[(b * p.channels + c) * p.halo + j], &xv = x[(row + s) * p.channels + c];
          if (!kAdd)
            hv = same ? xv : T(0);
          else if (same)
            xv += hv;
        }
      }
  });
}

}  // namespace

void causal_conv1d_forward_cp(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state,
                              const Tensor& entering, Communicator& cp) {
  const ConvHalo p = check_cp(in);
  check_shape(entering, {p.batch, p.channels, p.halo});
  // This shard's initial state: the previous shard's halo where its last document goes on (else
  // 0); the sequence's on rank 0.
  move_halo<false>(p, *in.x, entering, in.stream);
  shard_entering_state(nullptr, in.seq_idx, entering, in.initial_state, entering, cp, in.stream);
  Conv1dInputs from = in;
  from.initial_state = &entering;
  causal_conv1d_forward(from, y, final_state);
}

void causal_conv1d_backward_cp(const Conv1dInputs& in, const Tensor& entering, const Tensor& dy,
                               const Tensor* dfinal_state, const Conv1dGrads& grads,
                               Communicator& cp, const Tensor* workspace) {
  const ConvHalo p = check_cp(in);
  check_shape(entering, {p.batch, p.channels, p.halo});
  Conv1dInputs from = in;
  from.initial_state = &entering;
  const int r = cp.rank(), last = cp.size() - 1;
  // This shard's gradients, and that of its initial state, which belongs to the previous
  // shard's last inputs.
  const ScratchTensor g0(in.x->dtype, {p.batch, p.channels, p.halo}, in.x->device, in.stream),
      next(in.x->dtype, {p.batch, p.channels, p.halo}, in.x->device, in.stream);
  const Tensor& g = grads.dinitial_state ? *grads.dinitial_state : g0.t;
  Conv1dGrads mine = grads;
  mine.dinitial_state = &g;
  causal_conv1d_backward(from, dy, r == last ? dfinal_state : nullptr, mine, workspace);
  // The next shard's initial-state gradient (0 where its document does not go on), onto the
  // last inputs this shard sent it.
  shard_arriving_grad(nullptr, in.seq_idx, g, nullptr, next.t, cp, in.stream);
  if (r != last && grads.dx) move_halo<true>(p, *grads.dx, next.t, in.stream);
}

}  // namespace braid
