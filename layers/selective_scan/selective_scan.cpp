// Device dispatch of the selective scan: validates GPU tensors and builds the kernel Params.
#include "layers/selective_scan/selective_scan.h"
#include "layers/selective_scan/selective_scan_cuda.h"

namespace braid {

void selective_scan_forward_gpu(const ScanInputs& in, const Tensor& y, const Tensor* final_state) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)y, (void)final_state;
  BRAID_FAIL("selective_scan: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const ScanDims d = selective_scan_dims(in);
  const DType act = in.u->dtype;
  BRAID_CHECK(act == DType::bf16 || act == DType::f32,
              "selective_scan (CUDA): activations must be bf16 or f32, got ", in.u->describe());
  check_shape(y, {d.b, d.t, d.c});
  for (const Tensor* t : {in.delta, in.B, in.C, in.z, &y})
    if (t) check_same_dtype(*in.u, *t);
  for (const Tensor* t : {in.A, in.D, in.delta_bias, in.initial_state, final_state})
    if (t)
      BRAID_CHECK(t->dtype == DType::f32, "selective_scan (CUDA): ", t->describe(), " must be f32");
  if (final_state) check_shape(*final_state, {d.b, d.c, d.n});
  for (const Tensor* t : {in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.delta_bias, in.seq_idx,
                          in.initial_state, &y, final_state}) {
    if (!t) continue;
    BRAID_CHECK(t->device == Device::cuda && t->is_contiguous(),
                "selective_scan (CUDA): ", t->describe(), " must be a contiguous GPU tensor");
  }
  BRAID_CHECK(d.b * d.t * d.c < (int64_t(1) << 40) && d.t < (int64_t(1) << 31),
              "selective_scan (CUDA): sizes too large");
  ScanParams p;
  p.batch = int(d.b), p.seqlen = int(d.t), p.channels = int(d.c), p.d_state = int(d.n),
  p.groups = int(d.g);
  p.bf16 = act == DType::bf16;
  p.delta_softplus = in.delta_softplus;
  p.u = in.u->data, p.delta = in.delta->data, p.z = in.z ? in.z->data : nullptr;
  p.B = in.B->data, p.C = in.C->data, p.y = y.data;
  p.u_batch_stride = d.t * d.c, p.u_time_stride = d.c;
  p.bc_batch_stride = d.t * d.g * d.n, p.bc_time_stride = d.g * d.n;
  p.A = in.A->ptr<float>();
  p.D = in.D ? in.D->ptr<float>() : nullptr;
  p.delta_bias = in.delta_bias ? in.delta_bias->ptr<float>() : nullptr;
  p.seq_idx = in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr;
  p.initial_state = in.initial_state ? in.initial_state->ptr<float>() : nullptr;
  p.final_state = final_state ? final_state->ptr<float>() : nullptr;
  selective_scan_fwd_cuda(p, in.stream);
#endif
}

}  // namespace braid
