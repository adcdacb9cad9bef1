// Where a single-GPU training step's time goes: for a run configuration (its model, micro_batch
// and seq_len), the forward + backward time of one layer of each type of the pattern (a model of
// two such layers less a model of one, so norms and residual adds are counted with the layer),
// the rest of the model (embedding, final norm, output projection and loss in row chunks), the
// whole model's forward + backward and the optimizer step (global norm and AdamW), each the
// median of 5 after 2 warm-ups (wall clock around a device synchronisation). Per layer type:
// time, model TFLOP/s (Model::flops_per_token) and the share of the predicted step.
// Usage: bench_model_gpu --config FILE [section.key=value ...] [--out results.json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "launch/config.h"
#include "layers/model/model.h"
#include "optim/adamw.h"

namespace {

using namespace braid;

double median_s(Backend& gpu, const std::function<void()>& f) {
  for (int i = 0; i < 2; ++i) f();
  gpu.synchronize({});
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    gpu.synchronize({});
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string config;
  std::vector<std::string> overrides;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" && i + 1 < argc)
      config = argv[++i];
    else if (a == "--out" && i + 1 < argc)
      ++i;
    else
      overrides.push_back(a);
  }
  if (config.empty()) {
    std::fprintf(stderr, "usage: bench_model_gpu --config FILE [key=value ...] [--out FILE]\n");
    return 2;
  }
  const RunConfig run = load_config(config, overrides);
  const int64_t b = run.train.micro_batch, t = run.train.seq_len, m = b * t;
  auto gpu = make_cuda_backend(0);
  // One packed batch: random tokens, documents of 1024 tokens.
  std::vector<int32_t> host(4 * size_t(m));
  for (int64_t i = 0; i < m; ++i) {
    host[i] = int32_t((i * 2654435761u) % uint64_t(run.model.vocab_size));
    host[m + i] = int32_t((i * 40503u + 7) % uint64_t(run.model.vocab_size));
    host[2 * m + i] = int32_t(i % t / 1024);
    host[3 * m + i] = int32_t(i % t % 1024);
  }
  void* dev = gpu->allocate(host.size() * sizeof(int32_t));
  gpu->copy(dev, Device::cuda, host.data(), Device::cpu, host.size() * sizeof(int32_t), {});
  auto part = [&](int k, const char* name) {
    return Tensor::contiguous_view(static_cast<int32_t*>(dev) + k * m, DType::i32, Device::cuda,
                                   {b, t}, name);
  };
  const Batch batch{part(0, "tokens"), part(1, "targets"), part(2, "seq_idx"),
                    part(3, "positions")};
  const double gs = 1.0 / double(m);
  auto model_seconds = [&](const std::string& pattern) {
    ModelConfig c = run.model;
    c.pattern = pattern;
    Model model(c, DType::bf16, *gpu, b, t, 1, {}, nullptr, nullptr, 1, 0, {0},
                parse_recompute(run.train.recompute));
    model.initialize(1);
    return median_s(*gpu, [&] { model.forward_backward(batch, gs, 1.0); });
  };
  const std::string layers = pattern_layers(run.model.pattern);
  std::map<char, int> count;
  for (char c : layers) ++count[c];
  std::printf("%s: micro_batch %lld x seq_len %lld, recompute %s\n", config.c_str(), (long long)b,
              (long long)t, run.train.recompute.c_str());
  struct Row {
    std::string what;
    int n;
    double seconds, flops;
  };
  std::vector<Row> rows;
  double one_layer_rest = 1e30;
  for (const auto& [c, n] : count) {
    const double t1 = model_seconds(std::string(1, c)), t2 = model_seconds(std::string(2, c));
    ModelConfig mc = run.model;
    mc.pattern = std::string(2, c);
    ModelConfig mc1 = run.model;
    mc1.pattern = std::string(1, c);
    Model probe2(mc, DType::bf16, *gpu, 1, 1), probe1(mc1, DType::bf16, *gpu, 1, 1);
    const double f = (probe2.flops_per_token(t) - probe1.flops_per_token(t)) * double(m);
    rows.push_back({std::string("layer '") + c + "'", n, t2 - t1, f});
    one_layer_rest = std::min(one_layer_rest, t1 - (t2 - t1));
  }
  rows.push_back({"embedding, final norm, head + loss", 1, one_layer_rest,
                  6.0 * double(run.model.d_model) * double(run.model.vocab_size) * double(m)});
  // The whole model and the optimizer.
  double whole = 0, opt_s = 0, whole_flops = 0;
  {
    Model model(run.model, DType::bf16, *gpu, b, t, 1, {}, nullptr, nullptr, 1, 0, {0},
                parse_recompute(run.train.recompute));
    model.initialize(1);
    whole = median_s(*gpu, [&] { model.forward_backward(batch, gs, 1.0); });
    whole_flops = model.flops_per_token(t) * double(m);
    AdamW opt(model.params(), run.adamw, *gpu);
    opt_s = median_s(*gpu, [&] { opt.step(1e-5, opt.grad_norm()); });
  }
  double predicted = opt_s;
  for (const Row& r : rows) predicted += r.n * r.seconds;
  std::printf("%-36s %5s %10s %10s %8s %7s\n", "part", "count", "ms each", "ms total", "TFLOP/s",
              "share");
  std::string json = "{\"config\": \"" + config + "\", \"micro_batch\": " + std::to_string(b) +
                     ", \"seq_len\": " + std::to_string(t) + ", \"parts\": [";
  auto line = [&](const std::string& what, int n, double s, double flops) {
    std::printf("%-36s %5d %10.3f %10.3f %8.1f %6.1f%%\n", what.c_str(), n, 1e3 * s, 1e3 * s * n,
                flops > 0 ? flops / s / 1e12 : 0.0, 100 * s * n / predicted);
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"part\": \"%s\", \"count\": %d, \"ms_each\": %.4f, \"tflops\": %.1f}",
                  json.back() == '[' ? "" : ", ", what.c_str(), n, 1e3 * s,
                  flops > 0 ? flops / s / 1e12 : 0.0);
    json += buf;
  };
  for (const Row& r : rows) line(r.what, r.n, r.seconds, r.flops);
  line("optimizer (norm, AdamW, bf16 copies)", 1, opt_s, 0);
  std::printf(
      "predicted step %.1f ms; measured forward+backward %.1f ms + optimizer %.1f ms = "
      "%.1f ms: %.0f tokens/s, MFU %.1f%% of 989 TFLOP/s\n",
      1e3 * predicted, 1e3 * whole, 1e3 * opt_s, 1e3 * (whole + opt_s), double(m) / (whole + opt_s),
      100 * whole_flops / (whole + opt_s) / 989e12);
  char tail[256];
  std::snprintf(tail, sizeof(tail),
                "], \"forward_backward_ms\": %.3f, \"optimizer_ms\": %.3f, \"mfu\": %.4f}",
                1e3 * whole, 1e3 * opt_s, whole_flops / (whole + opt_s) / 989e12);
  json += tail;
  gpu->release(dev);
  return bench::write_text(bench::out_path(argc, argv), json) ? 0 : 1;
}
