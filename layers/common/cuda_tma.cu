// Host side of cuda_tma.cuh: tensor maps, encoded by the driver's cuTensorMapEncodeTiled (reached
// through the runtime's entry-point query, so nothing links libcuda directly).
#include "layers/common/cuda_tma.cuh"

#include <cudaTypedefs.h>

#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  // The driver's function pointer, looked up once per process (immutable after).
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                cudaEnableDefault, &found));
    BRAID_CHECK(found == cudaDriverEntryPointSuccess && p,
                "CUDA: the driver has no cuTensorMapEncodeTiled (a Hopper driver is needed)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

}  // namespace

CUtensorMap tma_panel_map(const void* base, int64_t rows, int64_t heads, int64_t cols,
                          int box_rows) {
  BRAID_CHECK(cols % 64 == 0 && box_rows > 0 && box_rows <= 256, "tma_panel_map: columns ", cols,
              " must be a multiple of 64, box rows ", box_rows, " in [1, 256]");
  BRAID_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0,
              "tma_panel_map: the tensor must start on a 16-byte boundary");
  CUtensorMap map;
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(cols) * 2, cuuint64_t(heads * cols) * 2};  // bytes
  const cuuint32_t box[3] = {64, 1, cuuint32_t(box_rows)};
  const cuuint32_t step[3] = {1, 1, 1};
  const CUresult r =
      encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims,
                     strides, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  BRAID_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (error ", int(r), ") for a [", rows,
              ", ", heads, ", ", cols, "] bf16 tensor, box ", box_rows, " x 1 x 64");
  return map;
}

}  // namespace braid
