// A chain of P V pieces y = tanh(W_k x) for the pipeline executor's tests: the pieces of one
// stage (piece c P + stage is chunk c), or (stage 0, stages 1, chunks = all pieces) the whole
// chain; loss 0.5 |y|^2 per microbatch, f64 on the host. The first piece's inputs are fixed
// values per microbatch; the executor fills the other pieces' inputs and output gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "parallel/pipeline_executor.h"

namespace braid::test {

constexpr int kRows = 3, kDim = 4;

inline double weight(int piece, int i) {
  return 0.6 * std::sin(1.3 * piece + 0.7 * i + 0.2);
}
inline double input_value(int mb, int i) {
  return std::cos(0.9 * mb + 0.45 * i);
}

// The pieces of one stage, or (stage = 0, stages = 1, chunks = all pieces) the whole chain.
class ChainStage : public PipeStage {
 public:
  ChainStage(int stage, int stages, int chunks, int microbatches)
      : s_(stage), p_(stages), v_(chunks), m_(microbatches), last_(stages * chunks - 1) {
    const size_t per = size_t(m_) * v_ * kRows * kDim;
    in_.assign(per, 0), out_.assign(per, 0), gout_.assign(per, 0), gin_.assign(per, 0);
    dw_.assign(size_t(v_) * kDim * kDim, 0);
    for (int mb = 0; mb < m_; ++mb)
      for (int i = 0; i < kRows * kDim; ++i) in_[at(mb, 0) + i] = input_value(mb, i);
  }
  Tensor input(int mb, int c) override { return view(in_, mb, c); }
  Tensor output(int mb, int c) override { return view(out_, mb, c); }
  Tensor output_grad(int mb, int c) override { return view(gout_, mb, c); }
  Tensor input_grad(int mb, int c) override { return view(gin_, mb, c); }
  void forward(int mb, int c) override {
    const double* x = &in_[at(mb, c)];
    double* y = &out_[at(mb, c)];
    const int k = piece(c);
    for (int r = 0; r < kRows; ++r)
      for (int o = 0; o < kDim; ++o) {
        double acc = 0;
        for (int i = 0; i < kDim; ++i) acc += weight(k, o * kDim + i) * x[r * kDim + i];
        y[r * kDim + o] = std::tanh(acc);
      }
  }
  void backward(int mb, int c) override {
    const double *x = &in_[at(mb, c)], *y = &out_[at(mb, c)];
    double* g = &gout_[at(mb, c)];
    if (piece(c) == last_)
      for (int i = 0; i < kRows * kDim; ++i) g[i] = y[i];  // d(0.5 |y|^2)/dy
    double* gx = &gin_[at(mb, c)];
    double* dw = &dw_[size_t(c) * kDim * kDim];
    const int k = piece(c);
    for (int i = 0; i < kRows * kDim; ++i) gx[i] = 0;
    for (int r = 0; r < kRows; ++r)
      for (int o = 0; o < kDim; ++o) {
        const double ga = g[r * kDim + o] * (1 - y[r * kDim + o] * y[r * kDim + o]);
        for (int i = 0; i < kDim; ++i) {
          dw[o * kDim + i] += ga * x[r * kDim + i];
          gx[r * kDim + i] += weight(k, o * kDim + i) * ga;
        }
      }
  }
  int piece(int c) const { return c * p_ + s_; }
  const double* dw(int c) const { return &dw_[size_t(c) * kDim * kDim]; }
  const double* first_input_grad(int mb) const { return &gin_[at(mb, 0)]; }

 private:
  size_t at(int mb, int c) const { return (size_t(mb) * v_ + c) * kRows * kDim; }
  Tensor view(std::vector<double>& v, int mb, int c) {
    return Tensor::contiguous_view(&v[at(mb, c)], DType::f64, Device::cpu, {kRows, kDim}, "act");
  }
  int s_, p_, v_, m_, last_;
  std::vector<double> in_, out_, gout_, gin_, dw_;
};

// Where a stage's gradients (each chunk's dW; on the stage holding piece 0, each microbatch's
// input gradient) first differ from the whole chain's by more than 1e-12 relative (the same sums
// in at most another order of the microbatches), with the error; empty when they agree.
inline std::string chain_mismatch(const ChainStage& mine, int chunks, int microbatches,
                                  const ChainStage& whole) {
  auto check = [](const std::string& what, const double* got, const double* want, int n) {
    double err = 0, scale = 0;
    for (int i = 0; i < n; ++i)
      err = std::max(err, std::fabs(got[i] - want[i])), scale = std::max(scale, std::fabs(want[i]));
    if (err <= 1e-12 * std::max(scale, 1.0)) return std::string();
    return what + ": error " + std::to_string(err) + " (scale " + std::to_string(scale) + ")";
  };
  for (int c = 0; c < chunks; ++c) {
    const std::string bad = check("dW of piece " + std::to_string(mine.piece(c)), mine.dw(c),
                                  whole.dw(mine.piece(c)), kDim * kDim);
    if (!bad.empty()) return bad;
  }
  if (mine.piece(0) == 0)
    for (int mb = 0; mb < microbatches; ++mb) {
      const std::string bad =
          check("dx of microbatch " + std::to_string(mb), mine.first_input_grad(mb),
                whole.first_input_grad(mb), kRows * kDim);
      if (!bad.empty()) return bad;
    }
  return "";
}

}  // namespace braid::test
