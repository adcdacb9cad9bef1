// CPU reference matrix products. Inner loops are written so the compiler vectorises them without
// reassociating sums: dot products keep 8 independent partial sums, combined in a fixed order.
#include <cstring>

#include "layers/linear/linear.h"
#include "runtime/parallel_for.h"

namespace braid::ref {
namespace {

// Four dot products of a[0:k] with b0..b3, 8 lanes each, lanes summed pairwise in fixed order.
template <typename T>
inline void dot4(const T* a, const T* b0, const T* b1, const T* b2, const T* b3, int64_t k,
                 T out[4]) {
  T s0[8] = {}, s1[8] = {}, s2[8] = {}, s3[8] = {};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const T av = a[i + l];
      s0[l] += av * b0[i + l];
      s1[l] += av * b1[i + l];
      s2[l] += av * b2[i + l];
      s3[l] += av * b3[i + l];
    }
  }
  for (int l = 0; i + l < k; ++l) {
    const T av = a[i + l];
    s0[l] += av * b0[i + l];
    s1[l] += av * b1[i + l];
    s2[l] += av * b2[i + l];
    s3[l] += av * b3[i + l];
  }
  T* sums[4] = {s0, s1, s2, s3};
  for (int j = 0; j < 4; ++j) {
    T* s = sums[j];
    out[j] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  }
}

}  // namespace

template <typename T>
void matmul_nt(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k, bool accumulate) {
  parallel_for(m, [&](int64_t i) {
    const T* ar = a + i * k;
    T* cr = c + i * n;
    int64_t j = 0;
    T out[4];
    for (; j + 4 <= n; j += 4) {
      dot4(ar, b + j * k, b + (j + 1) * k, b + (j + 2) * k, b + (j + 3) * k, k, out);
      for (int q = 0; q < 4; ++q) cr[j + q] = accumulate ? cr[j + q] + out[q] : out[q];
    }
    for (; j < n; ++j) {
      dot4(ar, b + j * k, b + j * k, b + j * k, b + j * k, k, out);
      cr[j] = accumulate ? cr[j] + out[0] : out[0];
    }
  });
}

template <typename T>
void matmul_nn(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k, bool accumulate) {
  parallel_for(m, [&](int64_t i) {
    T* cr = c + i * n;
    if (!accumulate) std::memset(cr, 0, sizeof(T) * n);
    const T* ar = a + i * k;
    for (int64_t p = 0; p < k; ++p) {
      const T av = ar[p];
      const T* br = b + p * n;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * br[j];
    }
  });
}

template <typename T>
void matmul_tn_acc(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k) {
  parallel_for(m, [&](int64_t i) {
    T* cr = c + i * n;
    for (int64_t p = 0; p < k; ++p) {
      const T av = a[p * m + i];
      const T* br = b + p * n;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * br[j];
    }
  });
}

template void matmul_nt<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);
template void matmul_nt<double>(const double*, const double*, double*, int64_t, int64_t, int64_t,
                                bool);
template void matmul_nn<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);
template void matmul_nn<double>(const double*, const double*, double*, int64_t, int64_t, int64_t,
                                bool);
template void matmul_tn_acc<float>(const float*, const float*, float*, int64_t, int64_t, int64_t);
template void matmul_tn_acc<double>(const double*, const double*, double*, int64_t, int64_t,
                                    int64_t);

}  // namespace braid::ref
