// Selective scan forward on the GPU against the CPU reference (skipped where no GPU is visible).
// Tolerance (DESIGN: accept kernel error <= 2x the error of a naive same-precision
// implementation, against fp64): for each case the CPU reference runs in f64 (the truth) and in
// f32 on the same inputs (bf16 cases: inputs rounded to bf16 first, the f32 output rounded to
// bf16 as a bf16 kernel must). The GPU's largest error against f64 must be at most twice that
// naive error, plus 1e-6 of the output scale for cases where the naive error happens to be ~0.
// ex2.approx (relative error 2^-22) and a different summation order stay well inside this.
#include <cmath>
#include <cstring>
#include <random>

#include "layers/selective_scan/selective_scan.h"
#include "runtime/backend.h"
#include "tests/test_util.h"

namespace braid {
namespace {

struct GpuScanCase {
  int64_t b, t, c, n, g;
  bool z, docs, init, softplus, bf16;
};

// Host values of one tensor and its copies in each dtype.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<double> v;
  int64_t numel() const { return static_cast<int64_t>(v.size()); }
};

HostTensor random_tensor(std::vector<int64_t> shape, double lo, double hi, bool round_bf16,
                         std::mt19937_64& g) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  HostTensor h{std::move(shape), std::vector<double>(n)};
  std::uniform_real_distribution<double> u(lo, hi);
  for (double& x : h.v) {
    const float f = float(u(g));
    x = round_bf16 ? double(from_bf16(to_bf16(f))) : double(f);
  }
  return h;
}

class GpuScan : public ::testing::TestWithParam<GpuScanCase> {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << "no GPU visible: CUDA kernel tests skipped";
    gpu_ = make_cuda_backend(0);
  }
  // A tensor on `dev` with dtype `t` holding h's values (memory kept by this fixture).
  Tensor make(const HostTensor& h, DType t, Device dev, const std::string& name) {
    std::vector<char> bytes(h.numel() * dtype_size(t));
    for (int64_t i = 0; i < h.numel(); ++i) {
      switch (t) {
        case DType::f64:
          reinterpret_cast<double*>(bytes.data())[i] = h.v[i];
          break;
        case DType::f32:
          reinterpret_cast<float*>(bytes.data())[i] = float(h.v[i]);
          break;
        case DType::bf16:
          reinterpret_cast<bf16*>(bytes.data())[i] = to_bf16(float(h.v[i]));
          break;
        case DType::i32:
          reinterpret_cast<int32_t*>(bytes.data())[i] = int32_t(h.v[i]);
          break;
        default:
          break;
      }
    }
    if (dev == Device::cpu) {
      host_.push_back(std::move(bytes));
      return Tensor::contiguous_view(host_.back().data(), t, dev, h.shape, name);
    }
    void* d = gpu_->allocate(bytes.size());
    device_.push_back(d);
    gpu_->copy(d, Device::cuda, bytes.data(), Device::cpu, bytes.size(), {});
    gpu_->synchronize({});
    return Tensor::contiguous_view(d, t, dev, h.shape, name);
  }
  Tensor empty(std::vector<int64_t> shape, DType t, Device dev, const std::string& name) {
    HostTensor h{shape, std::vector<double>(1)};
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    h.v.assign(n, 0.0);
    return make(h, t, dev, name);
  }
  std::vector<double> download(const Tensor& t) {
    std::vector<char> bytes(t.nbytes());
    gpu_->copy(bytes.data(), Device::cpu, t.data, Device::cuda, bytes.size(), {});
    gpu_->synchronize({});
    std::vector<double> out(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i)
      out[i] = t.dtype == DType::bf16 ? from_bf16(reinterpret_cast<bf16*>(bytes.data())[i])
                                      : reinterpret_cast<float*>(bytes.data())[i];
    return out;
  }
  void TearDown() override {
    for (void* d : device_) gpu_->release(d);
  }

  std::unique_ptr<Backend> gpu_;
  std::vector<std::vector<char>> host_;
  std::vector<void*> device_;
};

std::vector<double> host_values(const Tensor& t, bool round_bf16) {
  std::vector<double> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
    out[i] = round_bf16 ? double(from_bf16(to_bf16(float(v)))) : v;
  }
  return out;
}

double max_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i)
    e = std::isfinite(a[i]) ? std::max(e, std::abs(a[i] - ref[i])) : 1e30;
  return e;
}
double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

TEST_P(GpuScan, ForwardMatchesReference) {
  const GpuScanCase k = GetParam();
  std::mt19937_64 g(k.b * 1000003 + k.t * 1009 + k.c * 31 + k.n);
  const bool r = k.bf16;
  const HostTensor u = random_tensor({k.b, k.t, k.c}, -1, 1, r, g),
                   delta = random_tensor({k.b, k.t, k.c}, -1, 0.5, r, g);
  const HostTensor z = random_tensor({k.b, k.t, k.c}, -2, 2, r, g);
  const HostTensor Bm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, r, g),
                   Cm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, r, g);
  const HostTensor A = random_tensor({k.c, k.n}, -2, -0.2, false, g),
                   D = random_tensor({k.c}, -1, 1, false, g);
  const HostTensor bias = random_tensor({k.c}, -1, 0.5, false, g),
                   h0 = random_tensor({k.b, k.c, k.n}, -1, 1, false, g);
  HostTensor seq{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  for (int64_t i = 0; i < k.b; ++i)
    for (int64_t j = 0, doc = 0; j < k.t; ++j) {
      if (j > 0 && (j * 7 + i * 13) % 97 < 3) ++doc;
      seq.v[i * k.t + j] = double(doc);
    }
  auto inputs = [&](DType act, DType par, Device dev, std::vector<Tensor>& keep) {
    keep = {
        make(u, act, dev, "u"),  make(delta, act, dev, "delta"), make(A, par, dev, "A"),
        make(Bm, act, dev, "B"), make(Cm, act, dev, "C"),        make(D, par, dev, "D"),
        make(z, act, dev, "z"),  make(bias, par, dev, "bias"),   make(seq, DType::i32, dev, "seq"),
        make(h0, par, dev, "h0")};
    return ScanInputs{&keep[0],
                      &keep[1],
                      &keep[2],
                      &keep[3],
                      &keep[4],
                      &keep[5],
                      k.z ? &keep[6] : nullptr,
                      &keep[7],
                      k.docs ? &keep[8] : nullptr,
                      k.init ? &keep[9] : nullptr,
                      k.softplus};
  };
  std::vector<Tensor> k64, k32, kgpu;
  const ScanInputs in64 = inputs(DType::f64, DType::f64, Device::cpu, k64);
  const ScanInputs in32 = inputs(DType::f32, DType::f32, Device::cpu, k32);
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  const ScanInputs ing = inputs(act, DType::f32, Device::cuda, kgpu);
  Tensor y64 = empty({k.b, k.t, k.c}, DType::f64, Device::cpu, "y64"),
         y32 = empty({k.b, k.t, k.c}, DType::f32, Device::cpu, "y32");
  Tensor s64 = empty({k.b, k.c, k.n}, DType::f64, Device::cpu, "s64"),
         s32 = empty({k.b, k.c, k.n}, DType::f32, Device::cpu, "s32");
  Tensor yg = empty({k.b, k.t, k.c}, act, Device::cuda, "y_gpu"),
         sg = empty({k.b, k.c, k.n}, DType::f32, Device::cuda, "s_gpu");
  gpu_->fill(yg, std::nan(""), {});  // poison: an unwritten element fails
  gpu_->fill(sg, std::nan(""), {});
  selective_scan_forward(in64, y64, &s64);
  selective_scan_forward(in32, y32, &s32);
  selective_scan_forward(ing, yg, &sg);
  const std::vector<double> ref = host_values(y64, false), naive = host_values(y32, k.bf16),
                            got = download(yg);
  const std::vector<double> sref = host_values(s64, false), snaive = host_values(s32, false),
                            sgot = download(sg);
  const double tol = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
  const double stol = 2 * max_err(snaive, sref) + 1e-6 * max_abs(sref);
  EXPECT_LE(max_err(got, ref), tol) << "naive error " << max_err(naive, ref);
  EXPECT_LE(max_err(sgot, sref), stol) << "naive state error " << max_err(snaive, sref);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuScan,
    ::testing::Values(GpuScanCase{1, 1, 1, 16, 1, false, false, false, true, false},
                      GpuScanCase{1, 37, 130, 16, 1, true, true, true, true, false},
                      GpuScanCase{2, 333, 256, 16, 2, true, true, true, true, true},
                      GpuScanCase{3, 129, 96, 64, 4, true, false, true, true, true},
                      GpuScanCase{1, 200, 64, 32, 1, false, true, false, false, false},
                      GpuScanCase{2, 77, 48, 5, 3, true, true, true, true, true},
                      GpuScanCase{1, 50, 32, 256, 1, true, false, true, true, false},
                      GpuScanCase{4, 1024, 512, 16, 1, true, true, false, true, true},
                      GpuScanCase{2, 300, 64, 16, 2, true, true, true, true, false},
                      GpuScanCase{1, 129, 32, 64, 1, true, false, true, true, true},
                      GpuScanCase{3, 257, 48, 32, 3, false, true, true, true, true}));

}  // namespace
}  // namespace braid
