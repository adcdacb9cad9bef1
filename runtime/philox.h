// Counter-based random numbers: Philox4x32-10 keyed by the seed, with the counter made of
// (element index, tensor id). The same (seed, tensor id, element index) gives the same number on
// CPU and GPU, bit for bit, for any parallel layout: normals come from the inverse normal CDF
// (Acklam's rational approximation) computed in double with correctly rounded IEEE operations
// only (+ - * / sqrt, each un-contracted) and a polynomial log, never from libm.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BRAID_HD __host__ __device__ __forceinline__
#else
#define BRAID_HD inline
#endif

namespace braid::philox {

struct U32x4 {
  uint32_t v[4];
};

BRAID_HD uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11).
BRAID_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t lo0 = 0xD2511F53u * c.v[0], hi0 = mulhi(0xD2511F53u, c.v[0]);
    const uint32_t lo1 = 0xCD9E8D57u * c.v[2], hi1 = mulhi(0xCD9E8D57u, c.v[2]);
    c = U32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

BRAID_HD U32x4 bits(uint64_t seed, uint32_t tensor_id, uint64_t index) {
  U32x4 c{{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), tensor_id, 0u}};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Correctly rounded double operations that the compiler may not fuse or reorder, so host and
// device compute the same bits.
#if defined(__CUDA_ARCH__)
BRAID_HD double add(double a, double b) {
  return __dadd_rn(a, b);
}
BRAID_HD double mul(double a, double b) {
  return __dmul_rn(a, b);
}
BRAID_HD double div(double a, double b) {
  return __ddiv_rn(a, b);
}
BRAID_HD double sqrt_rn(double a) {
  return __dsqrt_rn(a);
}
BRAID_HD uint64_t double_bits(double a) {
  return static_cast<uint64_t>(__double_as_longlong(a));
}
BRAID_HD double bits_double(uint64_t u) {
  return __longlong_as_double(static_cast<long long>(u));
}
#else
BRAID_HD double add(double a, double b) {
  volatile double r = a + b;
  return r;
}
BRAID_HD double mul(double a, double b) {
  volatile double r = a * b;
  return r;
}
BRAID_HD double div(double a, double b) {
  volatile double r = a / b;
  return r;
}
BRAID_HD double sqrt_rn(double a) {
  return __builtin_sqrt(a);
}
BRAID_HD uint64_t double_bits(double a) {
  return __builtin_bit_cast(uint64_t, a);
}
BRAID_HD double bits_double(uint64_t u) {
  return __builtin_bit_cast(double, u);
}
#endif

// Uniform in [0, 1) with 24 random bits (exact conversion).
BRAID_HD float u01(uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}
// Uniform in (0, 1) with 32 random bits, in double (exact conversion).
BRAID_HD double u01_open(uint32_t x) {
  return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0);
}

// Natural log of x > 0 (normal doubles): x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, series to s^15 (relative error < 1e-12).
BRAID_HD double log_rn(double x) {
  const uint64_t u = double_bits(x);
  int e = static_cast<int>((u >> 52) & 0x7ffu) - 1023;
  double m = bits_double((u & 0xfffffffffffffull) | 0x3ff0000000000000ull);
  if (m > 1.4142135623730951) {
    m = mul(m, 0.5);
    e += 1;
  }
  const double s = div(add(m, -1.0), add(m, 1.0)), s2 = mul(s, s);
  double p = 1.0 / 15.0;
  for (int k = 13; k >= 1; k -= 2) p = add(mul(p, s2), 1.0 / k);
  return add(mul(static_cast<double>(e), 0.6931471805599453), mul(mul(2.0, s), p));
}

// Standard normal from p in (0, 1): Acklam's inverse-CDF approximation (relative error 1.2e-9),
// evaluated in double and rounded to float once.
BRAID_HD float inverse_normal_cdf(double p) {
  const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                       1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  const double b[5] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                       6.680131188771972e+01, -1.328068155288572e+01};
  const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                       -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  const double d[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                       3.754408661907416e+00};
  const double lo = 0.02425;
  if (p < lo || p > 1.0 - lo) {
    const double q = sqrt_rn(mul(-2.0, log_rn(p < lo ? p : add(1.0, -p))));
    double num = c[0];
    for (int i = 1; i < 6; ++i) num = add(mul(num, q), c[i]);
    double den = d[0];
    for (int i = 1; i < 4; ++i) den = add(mul(den, q), d[i]);
    den = add(mul(den, q), 1.0);
    const double z = div(num, den);
    return static_cast<float>(p < lo ? z : -z);
  }
  const double q = add(p, -0.5), r = mul(q, q);
  double num = a[0];
  for (int i = 1; i < 6; ++i) num = add(mul(num, r), a[i]);
  double den = b[0];
  for (int i = 1; i < 5; ++i) den = add(mul(den, r), b[i]);
  den = add(mul(den, r), 1.0);
  return static_cast<float>(div(mul(num, q), den));
}

BRAID_HD float uniform(uint64_t seed, uint32_t tensor_id, uint64_t index) {
  return u01(bits(seed, tensor_id, index).v[0]);
}
BRAID_HD float normal(uint64_t seed, uint32_t tensor_id, uint64_t index) {
  return inverse_normal_cdf(u01_open(bits(seed, tensor_id, index).v[0]));
}

}  // namespace braid::philox
