// The assembled model: f64 gradients of the total loss (cross-entropy + MoE auxiliary losses)
// with respect to every parameter tensor against finite differences, for patterns using every
// layer type and option; config validation; determinism; no allocation in a step.
#include <omp.h>

#include <cmath>

#include "layers/model/model.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

ModelConfig tiny_config(const std::string& pattern) {
  ModelConfig c;
  c.pattern = pattern;
  c.d_model = 8;
  c.vocab_size = 13;
  c.init_std = 0.3;  // large enough that every path carries gradient visibly
  c.mamba1 = {0, 12, 3, 2, 3, 1, false, 1e-6, 0.01, 0.2};
  c.mamba2.heads = 4, c.mamba2.head_dim = 3, c.mamba2.groups = 2, c.mamba2.d_state = 3;
  c.mamba2.d_conv = 4, c.mamba2.chunk = 3;
  c.attention = {0, 4, 2, 2, true, 10000.0};
  c.mlp.ffn = 10;
  c.moe.experts = 4, c.moe.top_k = 2, c.moe.ffn = 6, c.moe.aux_loss_coef = 0.1,
  c.moe.z_loss_coef = 0.05;
  return c;
}

struct BatchData {
  Tensor tokens, targets, seq, pos;
};

BatchData make_batch(Buffers& buf, int64_t b, int64_t t, int64_t vocab) {
  BatchData d{buf.make(DType::i32, {b, t}, "tokens"), buf.make(DType::i32, {b, t}, "targets"),
              buf.make(DType::i32, {b, t}, "seq_idx"), buf.make(DType::i32, {b, t}, "positions")};
  for (int64_t i = 0; i < b; ++i) {
    int32_t doc = 0, start = 0;
    for (int64_t j = 0; j < t; ++j) {
      if (j > 0 && (j + i) % 4 == 0) ++doc, start = int32_t(j);
      d.tokens.ptr<int32_t>()[i * t + j] = int32_t((j * 5 + i * 3 + 1) % vocab);
      d.targets.ptr<int32_t>()[i * t + j] = j == 2 ? -1 : int32_t((j * 7 + i + 2) % vocab);
      d.seq.ptr<int32_t>()[i * t + j] = doc;
      d.pos.ptr<int32_t>()[i * t + j] = int32_t(j) - start;
    }
  }
  return d;
}

struct ModelCase {
  std::string name, pattern;
  void (*tweak)(ModelConfig&);
};

class ModelGrad : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGrad, AllParametersMatchFiniteDifferences) {
  const ModelCase mc = GetParam();
  ModelConfig cfg = tiny_config(mc.pattern);
  if (mc.tweak) mc.tweak(cfg);
  auto backend = make_cpu_backend();
  const int64_t b = 2, t = 7;
  Model model(cfg, DType::f64, *backend, b, t);
  model.initialize(17);
  Buffers buf;
  BatchData bd = make_batch(buf, b, t, cfg.vocab_size);
  const Batch batch{bd.tokens, bd.targets, bd.seq, bd.pos};
  const double gs = 1.0 / 13, as = 0.5;
  auto loss = [&] {
    model.params().zero_grads();
    const Model::StepResult r = model.forward_backward(batch, gs, as);
    return r.loss.sum * gs + r.aux * as;
  };
  loss();
  // Keep the analytic gradients (the loss calls below overwrite them).
  std::vector<Tensor> grads;
  for (Param& p : model.params().all()) {
    if (!p.trainable) continue;
    Tensor g = buf.like(p.grad, p.name + ".grad_copy");
    std::memcpy(g.data, p.grad.data, p.grad.nbytes());
    grads.push_back(g);
  }
  size_t gi = 0;
  for (Param& p : model.params().all()) {
    if (!p.trainable) continue;
    test::expect_gradient(mc.name + ": " + p.name, p.value, grads[gi++], loss, 1e-6, 6);
  }
}

INSTANTIATE_TEST_SUITE_P(Patterns, ModelGrad,
                         ::testing::Values(ModelCase{"hybrid", "S-M*E", nullptr},
                                           ModelCase{"jamba_dt_bc_norm_no_rope_untied", "S*E",
                                                     [](ModelConfig& c) {
                                                       c.mamba1.dt_bc_norm = true;
                                                       c.attention.rope = false;
                                                       c.tie_embeddings = false;
                                                     }},
                                           ModelCase{"moe_sigmoid_shared_capacity", "E-E",
                                                     [](ModelConfig& c) {
                                                       c.moe.score = RouterScore::sigmoid;
                                                       c.moe.normalize_topk = true;
                                                       c.moe.shared_ffn = 5;
                                                       c.moe.capacity_factor = 1.0;
                                                       c.moe.balance_bias = true;
                                                     }},
                                           ModelCase{"mamba2_dt_limits_stage_cut", "MM|M",
                                                     [](ModelConfig& c) {
                                                       c.mamba2.dt_limit_max = 0.4;
                                                     }}),
                         [](const ::testing::TestParamInfo<ModelCase>& p) { return p.param.name; });

TEST(Model, ValidationNamesTheConstraint) {
  auto expect_error = [](ModelConfig c, const std::string& needle) {
    auto backend = make_cpu_backend();
    try {
      Model m(c, DType::f64, *backend, 1, 4);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(tiny_config("S-X"), "symbol 'X'");
  expect_error(tiny_config(""), "model.pattern is empty");
  ModelConfig c = tiny_config("*");
  c.attention.kv_heads = 3;
  expect_error(c, "attention.kv_heads = 3");
  c = tiny_config("M");
  c.mamba2.groups = 3;
  expect_error(c, "mamba2.groups = 3");
  c = tiny_config("E");
  c.moe.top_k = 5;
  expect_error(c, "moe.top_k = 5");
  c = tiny_config("E");
  c.moe.balance_bias = true;
  expect_error(c, "moe.balance_bias");
  c = tiny_config("S");
  c.mamba1.d_conv = 5;
  expect_error(c, "mamba1.d_conv = 5");
}

TEST(Model, StepIsDeterministicAcrossThreadCountsAndAllocatesNothing) {
  ModelConfig cfg = tiny_config("S-M*E");
  auto run = [&](int threads, int64_t* allocations) {
    omp_set_num_threads(threads);
    auto backend = make_cpu_backend();
    Model model(cfg, DType::f32, *backend, 2, 7);
    model.initialize(3);
    Buffers buf;
    BatchData bd = make_batch(buf, 2, 7, cfg.vocab_size);
    const int64_t before = backend->allocation_count();
    model.params().zero_grads();
    const auto r = model.forward_backward({bd.tokens, bd.targets, bd.seq, bd.pos}, 0.1, 1.0);
    *allocations = backend->allocation_count() - before;
    std::vector<float> out{float(r.loss.sum), float(r.aux)};
    for (const Param& p : model.params().all())
      if (p.trainable)
        out.insert(out.end(), p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel());
    return out;
  };
  int64_t a1 = -1, a2 = -1;
  const std::vector<float> one = run(1, &a1), two = run(2, &a2);
  omp_set_num_threads(omp_get_num_procs());
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)), 0)
      << "loss or gradients differ between 1 and 2 threads";
  EXPECT_EQ(a1, 0);
  EXPECT_EQ(a2, 0);
}

// Activation recompute computes the same function: the loss, the auxiliary losses and every
// gradient are bit-identical to keeping the activations (the recomputed forward repeats the same
// operations in the same order), the MoE routing counts are not doubled, and the activation
// memory shrinks (ssm: the Mamba mixers share one region; full: every block).
class RecomputePolicy : public ::testing::TestWithParam<std::string> {};

TEST_P(RecomputePolicy, IsBitIdenticalAndSavesMemory) {
  ModelConfig cfg = tiny_config(GetParam());
  cfg.moe.balance_bias = true, cfg.moe.score = RouterScore::sigmoid;
  Buffers buf;
  auto be = make_cpu_backend();
  BatchData bd = make_batch(buf, 2, 12, cfg.vocab_size);
  const Batch batch{bd.tokens, bd.targets, bd.seq, bd.pos};
  struct Out {
    double loss, aux;
    std::vector<std::vector<double>> grads;
    std::vector<std::vector<int32_t>> counts;
    size_t activations;
  };
  auto run = [&](Recompute r) {
    Model m(cfg, DType::f64, *be, 2, 12, 1, {}, nullptr, nullptr, 1, 0, {0}, r);
    m.initialize(7);
    m.params().zero_grads();
    const Model::StepResult res = m.forward_backward(batch, 0.1, 0.5);
    Out o{res.loss.sum, res.aux, {}, {}, m.memory().activations};
    for (const Param& p : m.params().all())
      if (p.trainable)
        o.grads.emplace_back(p.grad.ptr<double>(), p.grad.ptr<double>() + p.grad.numel());
    for (const Tensor& c : m.moe_step_counts())
      o.counts.emplace_back(c.ptr<int32_t>(), c.ptr<int32_t>() + c.numel());
    return o;
  };
  const Out none = run(Recompute::none);
  for (Recompute r : {Recompute::ssm, Recompute::full}) {
    const Out o = run(r);
    EXPECT_EQ(o.loss, none.loss);
    EXPECT_EQ(o.aux, none.aux);
    EXPECT_TRUE(o.grads == none.grads) << "gradients differ with recompute";
    EXPECT_TRUE(o.counts == none.counts) << "routing counts differ with recompute";
    EXPECT_LT(o.activations, none.activations);
  }
  EXPECT_LT(run(Recompute::full).activations, run(Recompute::ssm).activations);
  EXPECT_THROW(parse_recompute("some"), Error);
}

// Two orders of the blocks: the shared region must hold the largest, wherever it comes.
INSTANTIATE_TEST_SUITE_P(Patterns, RecomputePolicy, ::testing::Values("S-M*E-M", "ME*-S"));

// A pipeline stage's activation slots: two microbatches run forward into slots 0 and 1, then
// backward in order, give the outputs, auxiliary losses, routing counts and every gradient of the
// same two microbatches run forward and backward one after the other, bit for bit (the MoE block
// runs its forward again before its backward, as recompute does), in twice the activations.
TEST(Model, ActivationSlotsMatchOneMicrobatchAtATime) {
  ModelConfig cfg = tiny_config("S-ME*-M");  // stage 0: S - M E * (every mixer, MoE)
  const std::vector<int64_t> starts{0, 5};
  Buffers buf;
  auto be = make_cpu_backend();
  BatchData b0 = make_batch(buf, 2, 12, cfg.vocab_size), b1 = make_batch(buf, 2, 12, 13);
  for (int64_t i = 0; i < b1.tokens.numel(); ++i)  // another microbatch
    b1.tokens.ptr<int32_t>()[i] = (b1.tokens.ptr<int32_t>()[i] * 3 + 2) % int32_t(cfg.vocab_size);
  const Batch batches[2] = {{b0.tokens, b0.targets, b0.seq, b0.pos},
                            {b1.tokens, b1.targets, b1.seq, b1.pos}};
  Tensor dout[2] = {buf.make(DType::f64, {24, 8}, "dout0"), buf.make(DType::f64, {24, 8}, "dout1")};
  for (int k = 0; k < 2; ++k)
    for (int64_t i = 0; i < 24 * 8; ++i) dout[k].ptr<double>()[i] = std::sin(0.7 * i + k);
  struct Out {
    std::vector<std::vector<double>> outputs, grads;
    std::vector<std::vector<int32_t>> counts;
    double aux = 0;
    size_t activations = 0;
  };
  auto run = [&](int slots) {
    Model m(cfg, DType::f64, *be, 2, 12, 1, {}, nullptr, nullptr, 1, 0, starts, Recompute::none,
            slots);
    m.initialize(5);
    m.params().zero_grads();
    Out o;
    auto keep_output = [&] {
      const Tensor& y = m.stage_output();
      o.outputs.emplace_back(y.ptr<double>(), y.ptr<double>() + y.numel());
    };
    if (slots == 1) {
      for (int k = 0; k < 2; ++k) {
        o.aux += m.forward_backward(batches[k], 0.1, 0.5, nullptr, &dout[k]).aux;
        keep_output();
      }
    } else {
      for (int k = 0; k < 2; ++k) {
        m.use_activations(k);
        m.forward_for_backward(batches[k], 0.5);
        keep_output();
      }
      for (int k = 0; k < 2; ++k) {
        m.use_activations(k);
        o.aux += m.backward_after_forward(batches[k], 0.1, 0.5, &dout[k]).aux;
      }
    }
    for (const Param& p : m.params().all())
      if (p.trainable)
        o.grads.emplace_back(p.grad.ptr<double>(), p.grad.ptr<double>() + p.grad.numel());
    for (const Tensor& c : m.moe_step_counts())
      o.counts.emplace_back(c.ptr<int32_t>(), c.ptr<int32_t>() + c.numel());
    o.activations = m.memory().activations;
    return o;
  };
  const Out one = run(1), two = run(2);
  EXPECT_TRUE(two.outputs == one.outputs) << "stage outputs differ";
  EXPECT_NE(one.outputs[0], one.outputs[1]);  // two different microbatches
  EXPECT_TRUE(two.grads == one.grads) << "gradients differ with activation slots";
  EXPECT_TRUE(two.counts == one.counts) << "routing counts differ with activation slots";
  EXPECT_EQ(two.aux, one.aux);
  EXPECT_NE(one.aux, 0.0);
  EXPECT_GT(two.activations, one.activations);
  Model m(cfg, DType::f64, *be, 2, 12, 1, {}, nullptr, nullptr, 1, 0, starts, Recompute::none, 2);
  EXPECT_THROW(m.use_activations(2), Error);
}

TEST(Model, HfStyleParameterNames) {
  auto backend = make_cpu_backend();
  Model model(tiny_config("S-M*E"), DType::f32, *backend, 1, 4);
  for (const char* n :
       {"embeddings.weight", "layers.0.norm.weight", "layers.0.mixer.in_proj.weight",
        "layers.0.mixer.x_proj.weight", "layers.0.mixer.dt_proj.bias", "layers.0.mixer.A_log",
        "layers.1.mixer.gate_proj.weight", "layers.2.mixer.dt_bias", "layers.2.mixer.norm.weight",
        "layers.3.mixer.q_proj.weight", "layers.3.mixer.o_proj.weight",
        "layers.4.mixer.gate.weight", "layers.4.mixer.experts.3.down_proj.weight", "norm_f.weight"})
    EXPECT_NE(model.params().find(n), nullptr) << n;
  EXPECT_EQ(model.params().find("lm_head.weight"), nullptr);  // tied
  EXPECT_EQ(model.params().find("layers.2.mixer.in_proj.weight")->shape,
            (std::vector<int64_t>{2 * 12 + 2 * 2 * 3 + 4, 8}));
}

// A tensor-parallel shard initialises to the slice of the logical tensor (init by logical index),
// for a normal, a uniform and an index-dependent (log_arange) init, along either dimension.
TEST(Params, ShardsInitialiseToSlicesOfTheLogicalTensor) {
  auto backend = make_cpu_backend();
  const std::vector<ParamInit> inits = {{ParamInit::Kind::normal, 0.02},
                                        {ParamInit::Kind::uniform, -1, 1},
                                        {ParamInit::Kind::log_arange}};
  for (const ParamInit& init : inits)
    for (int dim : {0, 1}) {
      ParamSet whole, part0, part1;
      whole.add("w", {6, 4}, init, true);
      part0.add("w", {6, 4}, init, true, true, {dim, 2, 0});
      part1.add("w", {6, 4}, init, true, true, {dim, 2, 1});
      for (ParamSet* ps : {&whole, &part0, &part1}) {
        ps->allocate(*backend, DType::f32);
        ps->initialize(7);
      }
      const Param& p1 = part1.all().front();
      EXPECT_EQ(p1.shape, dim == 0 ? (std::vector<int64_t>{3, 4}) : (std::vector<int64_t>{6, 2}));
      EXPECT_EQ(p1.global_shape, (std::vector<int64_t>{6, 4}));
      ASSERT_EQ(p1.boxes.size(), 1u);
      EXPECT_EQ(p1.boxes[0].offset,
                dim == 0 ? (std::vector<int64_t>{3, 0}) : (std::vector<int64_t>{0, 2}));
      const float* w = whole.all().front().value.ptr<float>();
      for (const ParamSet* ps : {&part0, &part1}) {
        const Param& p = ps->all().front();
        for (int64_t r = 0; r < p.shape[0]; ++r)
          for (int64_t c = 0; c < p.shape[1]; ++c)
            EXPECT_EQ(p.value.ptr<float>()[r * p.shape[1] + c],
                      w[(r + p.boxes[0].offset[0]) * 4 + c + p.boxes[0].offset[1]])
                << "dim " << dim << " element " << r << "," << c;
      }
    }
}

}  // namespace
}  // namespace braid
