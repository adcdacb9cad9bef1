// Context parallelism on GPUs over an NCCL cp group (under mpirun, one rank per GPU; exit 77,
// skipped, with fewer GPUs than ranks): each rank holds a shard of every sequence.
//
// Attention: its shard of o, lse, dq, dk and dv must match the whole-sequence run on one GPU.
// - o, lse and dq of a row are computed on one rank by the same kernels over the same gathered
//   keys, in the same order, and the other ranks add zeros: equal bit for bit.
// - dk and dv sum the queries of every rank: each rank's part is rounded to bf16 and NCCL adds the
//   parts in bf16, against one f32 sum rounded once: three bf16 roundings (each at most 2^-8 of
//   the value rounded, half of bf16's 2^-7 spacing) of values no larger than the largest part, so
//   the bound is 3 2^-8 of the largest |dk|, |dv| (the parts cancel little at these shapes).
// Shapes: batch 2, 4 query heads on 2 KV heads, head dims 64 and 128, shards of 200 and 384 tokens
// (not multiples of the kernels' tiles), with and without documents crossing the shard edges.
//
// SSD (state passing): y, the final state and every gradient against the f64 CPU reference of the
// whole sequence (the same bf16-rounded inputs). The shards' states cross ranks in f32 and enter
// the kernels where the whole run's chunk states would, so the context-parallel run may be off
// the reference by what the one-GPU run is, from either side: the bound is twice the one-GPU
// run's largest error plus one bf16 rounding (2^-8) of the largest value.
// Shapes: batch 2, 4 heads in 2 groups, P = N = 64, chunks of 64, shards of 192 tokens, an initial
// state and a final-state gradient, with and without documents.
//
// Selective scan (Mamba-1, state passing): y, the final state and every gradient the same way
// (batch 2, 64 channels, N = 16, one group, D, z and a delta bias, shards of 300 tokens).
//
// Causal conv1d (the halo): y equal bit for bit (the halo's bf16 inputs are copied, and every
// output sums the same products in the same order); dx, dw, dbias and the states against the
// reference as the SSD's. A shard's last W-1 inputs get their gradient in two bf16 parts (this
// shard's and the next one's) added and rounded: three roundings, within that bound.
// Shapes: batch 2, 96 channels (not a whole number of the kernels' 64-channel lines), W = 4,
// shards of 300 tokens, with documents of 149 tokens (one starts inside shard 0's halo).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "layers/attention/attention.h"
#include "layers/attention/attention_cp.h"
#include "layers/causal_conv1d/causal_conv1d.h"
#include "layers/causal_conv1d/causal_conv1d_cp.h"
#include "layers/selective_scan/selective_scan.h"
#include "layers/selective_scan/selective_scan_cp.h"
#include "layers/ssd/ssd.h"
#include "layers/ssd/ssd_cp.h"
#include "parallel/communicator.h"
#include "parallel/launch_env.h"
#include "runtime/dtype.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace braid;

int failures = 0;

// A GPU tensor of the given shape from host values (bf16 bits, f32 or i32), or zeros.
struct Dev {
  Tensor t;
  Dev(DType dtype, std::vector<int64_t> shape, const void* host = nullptr) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    const size_t bytes = size_t(n) * dtype_size(dtype);
    void* p = nullptr;
    cudaMalloc(&p, bytes + 16);
    if (host)
      cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    else
      cudaMemset(p, 0, bytes + 16);
    t = Tensor::contiguous_view(p, dtype, Device::cuda, shape, "t");
  }
  ~Dev() { cudaFree(t.data); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  // The values as floats (bf16 and f32 tensors).
  std::vector<float> host() const {
    std::vector<float> out(t.numel());
    if (t.dtype == DType::f32) {
      cudaMemcpy(out.data(), t.data, out.size() * 4, cudaMemcpyDeviceToHost);
    } else {
      std::vector<bf16> h(out.size());
      cudaMemcpy(h.data(), t.data, out.size() * 2, cudaMemcpyDeviceToHost);
      for (size_t i = 0; i < h.size(); ++i) out[i] = from_bf16(h[i]);
    }
    return out;
  }
};

// Deterministic values in [-1, 1) (the same on every rank), as bf16.
std::vector<bf16> values(int64_t n, uint32_t seed) {
  std::vector<bf16> v(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x = uint32_t(i) * 2654435761u ^ (seed * 40503u + 0x9e3779b9u);
    x ^= x >> 15, x *= 0x2c1b3c6du, x ^= x >> 12;
    v[i] = to_bf16(float(x % 20000u) / 10000.f - 1.f);
  }
  return v;
}

// Rows [t0, t0 + len) along dimension 1 of a [B, T, inner] array.
template <typename T>
std::vector<T> shard(const std::vector<T>& all, int64_t b, int64_t t, int64_t inner, int64_t t0,
                     int64_t len) {
  std::vector<T> out;
  for (int64_t i = 0; i < b; ++i)
    out.insert(out.end(), all.begin() + (i * t + t0) * inner,
               all.begin() + (i * t + t0 + len) * inner);
  return out;
}

void expect(bool ok, const std::string& what, double err, double bound, int rank) {
  std::printf("rank %d: %s: max error %.3g (bound %.3g)\n", rank, what.c_str(), err, bound);
  if (!ok) {
    std::fprintf(stderr, "rank %d: %s: error %.3g above %.3g\n", rank, what.c_str(), err, bound);
    ++failures;
  }
}
void compare(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
             double rel, int rank) {
  double err = got.size() == want.size() ? 0.0 : INFINITY, scale = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    const double e = std::isfinite(got[i]) ? std::fabs(double(got[i]) - want[i]) : INFINITY;
    err = std::max(err, e), scale = std::max(scale, std::fabs(double(want[i])));
  }
  const double bound = rel * scale;
  expect(err <= bound, what, err, bound, rank);
}

void check_attention(Communicator& cp, int64_t p, int64_t tr, bool docs) {
  const int r = cp.rank(), ranks = cp.size();
  const int64_t b = 2, t = tr * ranks, h = 4, hk = 2;
  const std::vector<bf16> q = values(b * t * h * p, 61), k = values(b * t * hk * p, 62),
                          v = values(b * t * hk * p, 63), go = values(b * t * h * p, 64);
  std::vector<int32_t> seq(b * t);  // documents of 37 tokens, crossing the shard edges
  for (int64_t i = 0; i < b * t; ++i) seq[i] = int32_t((i % t) / 37);
  const double scale = 1.0 / std::sqrt(double(p));
  const std::string tag = "P " + std::to_string(p) + ", shard " + std::to_string(tr) +
                          (docs ? ", documents" : ", one document") + ": ";

  // The whole sequence on this rank's GPU.
  Dev wq(DType::bf16, {b, t, h, p}, q.data()), wk(DType::bf16, {b, t, hk, p}, k.data()),
      wv(DType::bf16, {b, t, hk, p}, v.data()), wdo(DType::bf16, {b, t, h, p}, go.data()),
      wseq(DType::i32, {b, t}, seq.data());
  AttentionInputs whole{&wq.t, &wk.t, &wv.t, docs ? &wseq.t : nullptr, scale};
  Dev ws(DType::f32, {attention_gpu_workspace_elems(whole)});
  whole.workspace = &ws.t;
  Dev o(DType::bf16, {b, t, h, p}), lse(DType::f32, {b, h, t}), dq(DType::bf16, {b, t, h, p}),
      dk(DType::bf16, {b, t, hk, p}), dv(DType::bf16, {b, t, hk, p});
  attention_forward(whole, o.t, lse.t);
  attention_backward(whole, o.t, lse.t, wdo.t, dq.t, dk.t, dv.t);

  // This rank's shard, context parallel.
  const int64_t t0 = r * tr;
  const std::vector<bf16> sq = shard(q, b, t, h * p, t0, tr), sk = shard(k, b, t, hk * p, t0, tr),
                          sv = shard(v, b, t, hk * p, t0, tr), sgo = shard(go, b, t, h * p, t0, tr);
  const std::vector<int32_t> sseq = shard(seq, b, t, 1, t0, tr);
  Dev mq(DType::bf16, {b, tr, h, p}, sq.data()), mk(DType::bf16, {b, tr, hk, p}, sk.data()),
      mv(DType::bf16, {b, tr, hk, p}, sv.data()), mdo(DType::bf16, {b, tr, h, p}, sgo.data()),
      mseq(DType::i32, {b, tr}, sseq.data());
  const AttentionInputs mine{&mq.t, &mk.t, &mv.t, docs ? &mseq.t : nullptr, scale};
  Dev so(DType::bf16, {b, tr, h, p}), slse(DType::f32, {b, h, tr}), sdq(DType::bf16, {b, tr, h, p}),
      sdk(DType::bf16, {b, tr, hk, p}), sdv(DType::bf16, {b, tr, hk, p});
  attention_forward_cp(mine, so.t, slse.t, cp);
  attention_backward_cp(mine, so.t, slse.t, mdo.t, sdq.t, sdk.t, sdv.t, cp);
  cudaDeviceSynchronize();

  std::vector<float> lse_mine;
  const std::vector<float> lse_all = lse.host();
  for (int64_t i = 0; i < b * h; ++i)
    lse_mine.insert(lse_mine.end(), lse_all.begin() + i * t + t0,
                    lse_all.begin() + i * t + t0 + tr);
  compare(tag + "o", so.host(), shard(o.host(), b, t, h * p, t0, tr), 0.0, r);
  compare(tag + "lse", slse.host(), lse_mine, 0.0, r);
  compare(tag + "dq", sdq.host(), shard(dq.host(), b, t, h * p, t0, tr), 0.0, r);
  compare(tag + "dk", sdk.host(), shard(dk.host(), b, t, hk * p, t0, tr), 3 * std::ldexp(1.0, -8),
          r);
  compare(tag + "dv", sdv.host(), shard(dv.host(), b, t, hk * p, t0, tr), 3 * std::ldexp(1.0, -8),
          r);
}

// Host f64 copies of values, as a tensor (the CPU reference's inputs and outputs).
struct Host {
  std::vector<double> v;
  Tensor t;
  Host(std::vector<int64_t> shape, std::vector<double> values = {}) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    v = values.empty() ? std::vector<double>(n, 0.0) : std::move(values);
    t = Tensor::contiguous_view(v.data(), DType::f64, Device::cpu, shape, "h");
  }
};

// Deterministic values in [lo, hi), rounded to bf16 (as the GPU inputs hold them) or to f32.
std::vector<double> uniform(int64_t n, uint32_t seed, double lo, double hi, bool to_bf16_values) {
  const std::vector<bf16> u = values(n, seed);
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const double x = lo + (hi - lo) * (from_bf16(u[i]) + 1.0) / 2.0;
    out[i] = to_bf16_values ? from_bf16(to_bf16(float(x))) : double(float(x));
  }
  return out;
}

// A GPU tensor from f64 values in the given dtype (bf16 or f32).
std::unique_ptr<Dev> upload(DType dtype, std::vector<int64_t> shape, const std::vector<double>& v) {
  if (dtype == DType::bf16) {
    std::vector<bf16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = to_bf16(float(v[i]));
    return std::make_unique<Dev>(dtype, shape, h.data());
  }
  std::vector<float> h(v.begin(), v.end());
  return std::make_unique<Dev>(dtype, shape, h.data());
}

double max_err(const std::vector<float>& got, const std::vector<double>& want) {
  double e = got.size() == want.size() ? 0.0 : INFINITY;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i)
    e = std::max(e, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY);
  return e;
}

// The context-parallel values against the reference, within twice the one-GPU run's error plus a
// bf16 rounding of the largest value.
void against_reference(const std::string& what, const std::vector<float>& cp,
                       const std::vector<float>& one_gpu, const std::vector<double>& ref,
                       int rank) {
  double scale = 0;
  for (double x : ref) scale = std::max(scale, std::fabs(x));
  const double bound = 2 * max_err(one_gpu, ref) + std::ldexp(scale, -8);
  expect(max_err(cp, ref) <= bound, what, max_err(cp, ref), bound, rank);
}

// Sums each rank's part of a parameter gradient over the cp ranks (host values, MPI).
void sum_over_ranks(Communicator& world, std::initializer_list<std::vector<float>*> parts) {
  for (std::vector<float>* v : parts)
    world.all_reduce(
        Tensor::contiguous_view(v->data(), DType::f32, Device::cpu, {int64_t(v->size())}, "summed"),
        ReduceOp::sum);
}

// This rank's rows [t0, t0 + tr) of [B, T, inner] tensors: its context-parallel values against
// the same rows of the reference and of the one-GPU run.
struct ShardCheck {
  int64_t b, t, t0, tr;
  int rank;
  std::string tag;
  void rows(const char* what, const std::vector<float>& cp, const std::vector<float>& one_gpu,
            const Host& ref, int64_t inner) const {
    against_reference(tag + what, cp, shard(one_gpu, b, t, inner, t0, tr),
                      shard(ref.v, b, t, inner, t0, tr), rank);
  }
};

void check_ssd(Communicator& cp, Communicator& world, bool docs) {
  const int r = cp.rank(), ranks = cp.size();
  const int64_t b = 2, tr = 192, t = tr * ranks, h = 4, g = 2, p = 64, n = 64;
  const std::vector<double> x = uniform(b * t * h * p, 71, -1, 1, true),
                            bm = uniform(b * t * g * n, 72, -1, 1, true),
                            cm = uniform(b * t * g * n, 73, -1, 1, true),
                            dy = uniform(b * t * h * p, 74, -1, 1, true),
                            dt = uniform(b * t * h, 75, -3, -1, false),
                            a = uniform(h, 76, -1.5, -0.5, false),
                            dd = uniform(h, 77, -1, 1, false),
                            bias = uniform(h, 78, -0.5, 0.5, false),
                            h0 = uniform(b * h * p * n, 79, -1, 1, false),
                            dfin = uniform(b * h * p * n, 80, -1, 1, false);
  std::vector<int32_t> seq(b * t);  // documents of 101 tokens, crossing the shard edges
  for (int64_t i = 0; i < b * t; ++i) seq[i] = int32_t((i % t) / 101);
  const std::string tag = std::string("ssd, ") + (docs ? "documents" : "one document") + ": ";

  // The f64 reference of the whole sequence.
  Host hx({b, t, h, p}, x), hdt({b, t, h}, dt), ha({h}, a), hb({b, t, g, n}, bm),
      hc({b, t, g, n}, cm), hd({h}, dd), hbias({h}, bias), hh0({b, h, p, n}, h0),
      hdy({b, t, h, p}, dy), hdfin({b, h, p, n}, dfin);
  const Tensor hseq = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  SsdInputs ref{&hx.t,  &hdt.t, &ha.t, &hb.t, &hc.t, &hd.t, &hbias.t, docs ? &hseq : nullptr,
                &hh0.t, true};
  ref.chunk = 64;
  Host ry({b, t, h, p}), rfin({b, h, p, n}), rws({ssd_backward_workspace_elems(ref)}),
      rfws({ssd_forward_workspace_elems(ref)});
  ssd_forward(ref, ry.t, &rfin.t, rfws.t);
  Host rdx({b, t, h, p}), rddt({b, t, h}), rda({h}), rdb({b, t, g, n}), rdc({b, t, g, n}), rdd({h}),
      rdbias({h}), rdh0({b, h, p, n});
  ssd_backward(ref, hdy.t, &hdfin.t,
               {&rdx.t, &rddt.t, &rda.t, &rdb.t, &rdc.t, &rdd.t, &rdbias.t, &rdh0.t}, rws.t);

  // One GPU, the whole sequence; and this rank's shard, context parallel.
  struct Run {
    std::vector<float> y, fin, dx, ddt, da, db, dc, dd, dbias, dh0;
  };
  auto run = [&](int64_t t0, int64_t len, Communicator* group) {
    auto sh = [&](const std::vector<double>& all, int64_t inner) {
      return shard(all, b, t, inner, t0, len);
    };
    auto gx = upload(DType::bf16, {b, len, h, p}, sh(x, h * p)),
         gb = upload(DType::bf16, {b, len, g, n}, sh(bm, g * n)),
         gc = upload(DType::bf16, {b, len, g, n}, sh(cm, g * n)),
         gdy = upload(DType::bf16, {b, len, h, p}, sh(dy, h * p)),
         gdt = upload(DType::f32, {b, len, h}, sh(dt, h)), ga = upload(DType::f32, {h}, a),
         gd = upload(DType::f32, {h}, dd), gbias = upload(DType::f32, {h}, bias),
         gh0 = upload(DType::f32, {b, h, p, n}, h0), gdfin = upload(DType::f32, {b, h, p, n}, dfin);
    const std::vector<int32_t> sseq = shard(seq, b, t, 1, t0, len);
    Dev gseq(DType::i32, {b, len}, sseq.data());
    SsdInputs in{&gx->t,  &gdt->t, &ga->t,    &gb->t,
                 &gc->t,  &gd->t,  &gbias->t, docs ? &gseq.t : nullptr,
                 &gh0->t, true};
    in.chunk = 64;
    Dev y(DType::bf16, {b, len, h, p}), fin(DType::f32, {b, h, p, n}),
        ws(DType::f32, {ssd_forward_workspace_elems(in)}), entering(DType::f32, {b, h, p, n});
    Dev dx(DType::bf16, {b, len, h, p}), ddt(DType::f32, {b, len, h}), da(DType::f32, {h}),
        db(DType::bf16, {b, len, g, n}), dc(DType::bf16, {b, len, g, n}), ddd(DType::f32, {h}),
        dbias(DType::f32, {h}), dh0(DType::f32, {b, h, p, n});
    const SsdGrads grads{&dx.t, &ddt.t, &da.t, &db.t, &dc.t, &ddd.t, &dbias.t, &dh0.t};
    if (group) {
      ssd_forward_cp(in, y.t, &fin.t, entering.t, ws.t, *group);
      ssd_backward_cp(in, entering.t, gdy->t, &gdfin->t, grads, ws.t, *group);
    } else {
      ssd_forward(in, y.t, &fin.t, ws.t);
      ssd_backward(in, gdy->t, &gdfin->t, grads, ws.t);
    }
    cudaDeviceSynchronize();
    return Run{y.host(),  fin.host(), dx.host(),  ddt.host(),   da.host(),
               db.host(), dc.host(),  ddd.host(), dbias.host(), dh0.host()};
  };
  const Run one = run(0, t, nullptr);
  const int64_t t0 = r * tr;
  Run mine = run(t0, tr, &cp);
  // dA, dD and ddt_bias: each rank's part of the sum over the sequence.
  sum_over_ranks(world, {&mine.da, &mine.dd, &mine.dbias});
  const ShardCheck at{b, t, t0, tr, r, tag};
  at.rows("y", mine.y, one.y, ry, h * p);
  at.rows("dx", mine.dx, one.dx, rdx, h * p);
  at.rows("ddt", mine.ddt, one.ddt, rddt, h);
  at.rows("dB", mine.db, one.db, rdb, g * n);
  at.rows("dC", mine.dc, one.dc, rdc, g * n);
  against_reference(tag + "dA", mine.da, one.da, rda.v, r);
  against_reference(tag + "dD", mine.dd, one.dd, rdd.v, r);
  against_reference(tag + "ddt_bias", mine.dbias, one.dbias, rdbias.v, r);
  if (r == ranks - 1) against_reference(tag + "final state", mine.fin, one.fin, rfin.v, r);
  if (r == 0) against_reference(tag + "dinitial_state", mine.dh0, one.dh0, rdh0.v, r);
}

void check_scan(Communicator& cp, Communicator& world, bool docs) {
  const int r = cp.rank(), ranks = cp.size();
  const int64_t b = 2, tr = 300, t = tr * ranks, c = 64, n = 16, g = 1;
  const std::vector<double> u = uniform(b * t * c, 81, -1, 1, true),
                            delta = uniform(b * t * c, 82, -3, -1, true),
                            bm = uniform(b * t * g * n, 83, -1, 1, true),
                            cm = uniform(b * t * g * n, 84, -1, 1, true),
                            z = uniform(b * t * c, 85, -1, 1, true),
                            dy = uniform(b * t * c, 86, -1, 1, true),
                            a = uniform(c * n, 87, -2, -0.2, false),
                            dd = uniform(c, 88, -1, 1, false),
                            bias = uniform(c, 89, -0.5, 0.5, false),
                            h0 = uniform(b * c * n, 90, -1, 1, false),
                            dfin = uniform(b * c * n, 91, -1, 1, false);
  std::vector<int32_t> seq(b * t);  // documents of 173 tokens, crossing the shard edges
  for (int64_t i = 0; i < b * t; ++i) seq[i] = int32_t((i % t) / 173);
  const std::string tag = std::string("scan, ") + (docs ? "documents" : "one document") + ": ";

  Host hu({b, t, c}, u), hdelta({b, t, c}, delta), ha({c, n}, a), hb({b, t, g, n}, bm),
      hc({b, t, g, n}, cm), hd({c}, dd), hz({b, t, c}, z), hbias({c}, bias), hh0({b, c, n}, h0),
      hdy({b, t, c}, dy), hdfin({b, c, n}, dfin);
  const Tensor hseq = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  const ScanInputs ref{
      &hu.t,  &hdelta.t, &ha.t, &hb.t, &hc.t, &hd.t, &hz.t, &hbias.t, docs ? &hseq : nullptr,
      &hh0.t, true};
  Host ry({b, t, c}), rfin({b, c, n}), rws({selective_scan_workspace_elems(ref)});
  selective_scan_forward(ref, ry.t, &rfin.t, &rws.t);
  Host rdu({b, t, c}), rddelta({b, t, c}), rda({c, n}), rdb({b, t, g, n}), rdc({b, t, g, n}),
      rdd({c}), rdz({b, t, c}), rdbias({c}), rdh0({b, c, n});
  selective_scan_backward(
      ref, hdy.t, &hdfin.t,
      {&rdu.t, &rddelta.t, &rda.t, &rdb.t, &rdc.t, &rdd.t, &rdz.t, &rdbias.t, &rdh0.t}, rws.t);

  struct Run {
    std::vector<float> y, fin, du, ddelta, da, db, dc, dd, dz, dbias, dh0;
  };
  auto run = [&](int64_t t0, int64_t len, Communicator* group) {
    auto sh = [&](const std::vector<double>& all, int64_t inner) {
      return shard(all, b, t, inner, t0, len);
    };
    auto gu = upload(DType::bf16, {b, len, c}, sh(u, c)),
         gdelta = upload(DType::bf16, {b, len, c}, sh(delta, c)),
         gb = upload(DType::bf16, {b, len, g, n}, sh(bm, g * n)),
         gc = upload(DType::bf16, {b, len, g, n}, sh(cm, g * n)),
         gz = upload(DType::bf16, {b, len, c}, sh(z, c)),
         gdy = upload(DType::bf16, {b, len, c}, sh(dy, c)), ga = upload(DType::f32, {c, n}, a),
         gd = upload(DType::f32, {c}, dd), gbias = upload(DType::f32, {c}, bias),
         gh0 = upload(DType::f32, {b, c, n}, h0), gdfin = upload(DType::f32, {b, c, n}, dfin);
    const std::vector<int32_t> sseq = shard(seq, b, t, 1, t0, len);
    Dev gseq(DType::i32, {b, len}, sseq.data());
    const ScanInputs in{&gu->t,  &gdelta->t, &ga->t,
                        &gb->t,  &gc->t,     &gd->t,
                        &gz->t,  &gbias->t,  docs ? &gseq.t : nullptr,
                        &gh0->t, true};
    Dev y(DType::bf16, {b, len, c}), fin(DType::f32, {b, c, n}),
        ws(DType::f32, {selective_scan_workspace_elems(in)}), entering(DType::f32, {b, c, n});
    Dev du(DType::bf16, {b, len, c}), ddelta(DType::bf16, {b, len, c}), da(DType::f32, {c, n}),
        db(DType::bf16, {b, len, g, n}), dc(DType::bf16, {b, len, g, n}), ddd(DType::f32, {c}),
        dz(DType::bf16, {b, len, c}), dbias(DType::f32, {c}), dh0(DType::f32, {b, c, n});
    const ScanGrads grads{&du.t, &ddelta.t, &da.t, &db.t, &dc.t, &ddd.t, &dz.t, &dbias.t, &dh0.t};
    if (group) {
      selective_scan_forward_cp(in, y.t, &fin.t, entering.t, ws.t, *group);
      selective_scan_backward_cp(in, entering.t, gdy->t, &gdfin->t, grads, ws.t, *group);
    } else {
      selective_scan_forward(in, y.t, &fin.t, &ws.t);
      selective_scan_backward(in, gdy->t, &gdfin->t, grads, ws.t);
    }
    cudaDeviceSynchronize();
    return Run{y.host(),  fin.host(), du.host(), ddelta.host(), da.host(), db.host(),
               dc.host(), ddd.host(), dz.host(), dbias.host(),  dh0.host()};
  };
  const Run one = run(0, t, nullptr);
  const int64_t t0 = r * tr;
  Run mine = run(t0, tr, &cp);
  sum_over_ranks(world, {&mine.da, &mine.dd, &mine.dbias});
  const ShardCheck at{b, t, t0, tr, r, tag};
  at.rows("y", mine.y, one.y, ry, c);
  at.rows("du", mine.du, one.du, rdu, c);
  at.rows("ddelta", mine.ddelta, one.ddelta, rddelta, c);
  at.rows("dz", mine.dz, one.dz, rdz, c);
  at.rows("dB", mine.db, one.db, rdb, g * n);
  at.rows("dC", mine.dc, one.dc, rdc, g * n);
  against_reference(tag + "dA", mine.da, one.da, rda.v, r);
  against_reference(tag + "dD", mine.dd, one.dd, rdd.v, r);
  against_reference(tag + "ddelta_bias", mine.dbias, one.dbias, rdbias.v, r);
  if (r == ranks - 1) against_reference(tag + "final state", mine.fin, one.fin, rfin.v, r);
  if (r == 0) against_reference(tag + "dinitial_state", mine.dh0, one.dh0, rdh0.v, r);
}

void check_conv(Communicator& cp, Communicator& world, bool docs) {
  const int r = cp.rank(), ranks = cp.size();
  const int64_t b = 2, tr = 300, t = tr * ranks, c = 96, w = 4, hl = w - 1;
  const std::vector<double> x = uniform(b * t * c, 101, -1, 1, true),
                            wt = uniform(c * w, 102, -1, 1, true),
                            bias = uniform(c, 103, -0.5, 0.5, true),
                            dy = uniform(b * t * c, 104, -1, 1, true),
                            h0 = uniform(b * c * hl, 105, -1, 1, true),
                            dfin = uniform(b * c * hl, 106, -1, 1, true);
  // Documents of 149 tokens: one starts inside the halo of shard 0 (tokens 297..299), others
  // cross the shard edges.
  std::vector<int32_t> seq(b * t);
  for (int64_t i = 0; i < b * t; ++i) seq[i] = int32_t((i % t) / 149);
  const std::string tag = std::string("conv1d, ") + (docs ? "documents" : "one document") + ": ";

  Host hx({b, t, c}, x), hw({c, w}, wt), hbias({c}, bias), hh0({b, c, hl}, h0), hdy({b, t, c}, dy),
      hdfin({b, c, hl}, dfin);
  const Tensor hseq = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  const Conv1dInputs ref{&hx.t, &hw.t, &hbias.t, docs ? &hseq : nullptr, &hh0.t, true};
  Host ry({b, t, c}), rfin({b, c, hl}), rdx({b, t, c}), rdw({c, w}), rdb({c}), rdh0({b, c, hl});
  causal_conv1d_forward(ref, ry.t, &rfin.t);
  causal_conv1d_backward(ref, hdy.t, &hdfin.t, {&rdx.t, &rdw.t, &rdb.t, &rdh0.t});

  struct Run {
    std::vector<float> y, fin, dx, dw, db, dh0;
  };
  auto run = [&](int64_t t0, int64_t len, Communicator* group) {
    auto gx = upload(DType::bf16, {b, len, c}, shard(x, b, t, c, t0, len)),
         gdy = upload(DType::bf16, {b, len, c}, shard(dy, b, t, c, t0, len)),
         gw = upload(DType::bf16, {c, w}, wt), gbias = upload(DType::bf16, {c}, bias),
         gh0 = upload(DType::bf16, {b, c, hl}, h0), gdfin = upload(DType::bf16, {b, c, hl}, dfin);
    const std::vector<int32_t> sseq = shard(seq, b, t, 1, t0, len);
    Dev gseq(DType::i32, {b, len}, sseq.data());
    const Conv1dInputs in{&gx->t, &gw->t, &gbias->t, docs ? &gseq.t : nullptr, &gh0->t, true};
    Dev y(DType::bf16, {b, len, c}), fin(DType::bf16, {b, c, hl}), dx(DType::bf16, {b, len, c}),
        dw(DType::f32, {c, w}), db(DType::f32, {c}), dh0(DType::bf16, {b, c, hl}),
        ws(DType::f32, {causal_conv1d_workspace_elems(in)}), entering(DType::bf16, {b, c, hl});
    const Conv1dGrads grads{&dx.t, &dw.t, &db.t, &dh0.t};
    if (group) {
      causal_conv1d_forward_cp(in, y.t, &fin.t, entering.t, *group);
      causal_conv1d_backward_cp(in, entering.t, gdy->t, &gdfin->t, grads, *group, &ws.t);
    } else {
      causal_conv1d_forward(in, y.t, &fin.t);
      causal_conv1d_backward(in, gdy->t, &gdfin->t, grads, &ws.t);
    }
    cudaDeviceSynchronize();
    return Run{y.host(), fin.host(), dx.host(), dw.host(), db.host(), dh0.host()};
  };
  const Run one = run(0, t, nullptr);
  const int64_t t0 = r * tr;
  Run mine = run(t0, tr, &cp);
  // y: the same bf16 inputs (the halo is copied, not rounded) through the same arithmetic.
  compare(tag + "y", mine.y, shard(one.y, b, t, c, t0, tr), 0.0, r);
  sum_over_ranks(world, {&mine.dw, &mine.db});
  const ShardCheck at{b, t, t0, tr, r, tag};
  at.rows("dx", mine.dx, one.dx, rdx, c);
  against_reference(tag + "dw", mine.dw, one.dw, rdw.v, r);
  against_reference(tag + "dbias", mine.db, one.db, rdb.v, r);
  if (r == ranks - 1) against_reference(tag + "final state", mine.fin, one.fin, rfin.v, r);
  if (r == 0) against_reference(tag + "dinitial_state", mine.dh0, one.dh0, rdh0.v, r);
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  if (gpus < world->size()) {
    if (world->rank() == 0)
      std::printf("SKIP: %d GPUs for %d ranks (NCCL needs one GPU per rank)\n", gpus,
                  world->size());
    return 77;
  }
  cudaSetDevice(read_launch_env().local_rank % gpus);
  try {
    auto nccl = make_nccl(*world, "cp", comm_timeout_from_env(120));
    for (int64_t p : {64, 128})
      for (int64_t tr : {200, 384})
        for (bool docs : {false, true}) check_attention(*nccl, p, tr, docs);
    for (bool docs : {false, true}) check_ssd(*nccl, *world, docs);
    for (bool docs : {false, true}) check_scan(*nccl, *world, docs);
    for (bool docs : {false, true}) check_conv(*nccl, *world, docs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", world->rank(), e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures, argv[0]);
}
