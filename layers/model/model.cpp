#include "layers/model/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <tuple>

#include "layers/elementwise/elementwise.h"
#include "layers/embedding/embedding.h"
#include "layers/linear/linear.h"
#include "layers/linear/linear_cuda.h"
#include "layers/rmsnorm/rmsnorm.h"
#include "parallel/pipeline_schedule.h"

namespace braid {

std::string pattern_layers(const std::string& pattern) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    BRAID_REQUIRE(
        c == 'S' || c == 'M' || c == '*' || c == '-' || c == 'E' || c == '|', "model.pattern '",
        pattern, "': symbol '", c, "' at position ", i,
        " is not one of S (Mamba-1), M (Mamba-2), * (attention), - (MLP), E (MoE), | (stage cut)");
    if (c != '|') out += c;
  }
  return out;
}

void validate_model_config(const ModelConfig& c) {
  const std::string layers = pattern_layers(c.pattern);
  BRAID_REQUIRE(!layers.empty(), "model.pattern is empty: give at least one layer, e.g. 'M-M*'");
  BRAID_REQUIRE(c.d_model > 0, "model.d_model = ", c.d_model, " must be positive");
  BRAID_REQUIRE(c.vocab_size > 0, "model.vocab_size = ", c.vocab_size, " must be positive");
  BRAID_REQUIRE(c.norm_eps > 0, "model.norm_eps must be positive");
  BRAID_REQUIRE(c.init_std > 0, "model.init_std must be positive");
  auto has = [&](char s) { return layers.find(s) != std::string::npos; };
  if (has('S')) {
    const Mamba1Config& m = c.mamba1;
    BRAID_REQUIRE(m.d_inner > 0 && m.d_state >= 1 && m.d_state <= 256 && m.dt_rank > 0,
                  "mamba1: d_inner, dt_rank must be positive and d_state in [1, 256]");
    BRAID_REQUIRE(m.d_conv >= 2 && m.d_conv <= 4, "mamba1.d_conv = ", m.d_conv,
                  " must be 2, 3 or 4");
    BRAID_REQUIRE(m.groups >= 1 && m.d_inner % m.groups == 0, "mamba1.groups = ", m.groups,
                  " must divide mamba1 inner width ", m.d_inner);
    BRAID_REQUIRE(m.dt_min > 0 && m.dt_min <= m.dt_max, "mamba1: need 0 < dt_min <= dt_max");
  }
  if (has('M')) {
    const Mamba2Config& m = c.mamba2;
    BRAID_REQUIRE(m.heads > 0 && m.head_dim > 0 && m.d_state > 0,
                  "mamba2: heads, head_dim, d_state must be positive");
    BRAID_REQUIRE(m.groups >= 1 && m.heads % m.groups == 0, "mamba2.groups = ", m.groups,
                  " must divide mamba2.heads = ", m.heads);
    BRAID_REQUIRE(m.d_conv >= 2 && m.d_conv <= 4, "mamba2.d_conv = ", m.d_conv,
                  " must be 2, 3 or 4");
    BRAID_REQUIRE(m.chunk >= 1, "mamba2.chunk = ", m.chunk, " must be positive");
    BRAID_REQUIRE(m.dt_limit_min >= 0 && m.dt_limit_min <= m.dt_limit_max,
                  "mamba2: need 0 <= dt_limit_min <= dt_limit_max");
    BRAID_REQUIRE(m.dt_min > 0 && m.dt_min <= m.dt_max, "mamba2: need 0 < dt_min <= dt_max");
    BRAID_REQUIRE(m.a_init_min > 0 && m.a_init_min <= m.a_init_max,
                  "mamba2: need 0 < a_init_min <= a_init_max");
  }
  if (has('*')) {
    const AttentionConfig& a = c.attention;
    BRAID_REQUIRE(a.heads > 0 && a.kv_heads > 0 && a.head_dim > 0,
                  "attention: heads, kv_heads and head_dim must be positive");
    BRAID_REQUIRE(a.heads % a.kv_heads == 0, "attention.kv_heads = ", a.kv_heads,
                  " must divide attention.heads = ", a.heads);
    BRAID_REQUIRE(!a.rope || a.head_dim % 2 == 0, "attention.head_dim = ", a.head_dim,
                  " must be even for RoPE");
    BRAID_REQUIRE(!a.rope || a.rope_theta > 0, "attention.rope_theta must be positive");
  }
  if (has('-')) BRAID_REQUIRE(c.mlp.ffn > 0, "mlp.ffn = ", c.mlp.ffn, " must be positive");
  if (has('E')) {
    const MoeConfig& m = c.moe;
    BRAID_REQUIRE(m.experts >= 1 && m.ffn > 0 && m.shared_ffn >= 0,
                  "moe: experts and ffn must be positive");
    BRAID_REQUIRE(m.top_k >= 1 && m.top_k <= m.experts, "moe.top_k = ", m.top_k,
                  " must be in [1, moe.experts = ", m.experts, "]");
    BRAID_REQUIRE(!m.balance_bias || m.score == RouterScore::sigmoid,
                  "moe.balance_bias needs moe.score = sigmoid (the bias steers sigmoid scores)");
    BRAID_REQUIRE(m.aux_loss_coef >= 0 && m.z_loss_coef >= 0,
                  "moe: loss coefficients must be non-negative");
  }
}

void validate_layout_for_model(const ModelConfig& c, const Layout& l) {
  const std::string layers = pattern_layers(c.pattern);
  auto has = [&](char sym) { return layers.find(sym) != std::string::npos; };
  // Every (name, size) a tp degree must divide, for the pattern's layer types.
  std::vector<std::pair<std::string, int64_t>> tp_dims = {{"model.vocab_size", c.vocab_size}};
  if (has('*'))
    tp_dims.insert(tp_dims.end(), {{"attention.heads", c.attention.heads},
                                   {"attention.kv_heads", c.attention.kv_heads}});
  if (has('M'))
    tp_dims.insert(tp_dims.end(),
                   {{"mamba2.heads", c.mamba2.heads}, {"mamba2.groups", c.mamba2.groups}});
  if (has('S')) {
    tp_dims.push_back({"mamba1 inner width (mamba1.expand * model.d_model)", c.mamba1.d_inner});
    BRAID_REQUIRE(l.tp == 1 || c.mamba1.groups == 1, "mamba1.groups = ", c.mamba1.groups,
                  ": tensor parallelism (parallel.tp = ", l.tp,
                  ") splits Mamba-1 layers with one group only; set mamba1.groups=1 or "
                  "parallel.tp=1");
  }
  if (has('-')) tp_dims.push_back({"mlp.ffn", c.mlp.ffn});
  if (has('E') && c.moe.shared_ffn > 0) tp_dims.push_back({"moe.shared_ffn", c.moe.shared_ffn});
  auto divisors_of_all = [](const std::vector<std::pair<std::string, int64_t>>& dims) {
    std::string out;
    for (int64_t d = 1; d <= 64; ++d) {
      bool ok = true;
      for (const auto& [_, v] : dims) ok = ok && v % d == 0;
      if (ok) out += (out.empty() ? "" : ", ") + std::to_string(d);
    }
    return out;
  };
  for (const auto& [name, v] : tp_dims)
    BRAID_REQUIRE(v % l.tp == 0, name, " = ", v, " is not divisible by parallel.tp = ", l.tp,
                  " (tensor parallelism shards it); tp values that divide every sharded size: ",
                  divisors_of_all(tp_dims));
  if (has('E')) {
    BRAID_REQUIRE(l.tp == 1 || l.etp == l.tp, "parallel.etp = ", l.etp,
                  " with parallel.tp = ", l.tp,
                  ": tensor parallelism splits the MoE experts over the same ranks; set "
                  "parallel.etp=",
                  l.tp);
    BRAID_REQUIRE(c.moe.experts % l.ep == 0, "moe.experts = ", c.moe.experts,
                  " is not divisible by parallel.ep = ", l.ep,
                  "; ep values that work: ", divisors_of_all({{"moe.experts", c.moe.experts}}));
    BRAID_REQUIRE(c.moe.ffn % l.etp == 0, "moe.ffn = ", c.moe.ffn,
                  " is not divisible by parallel.etp = ", l.etp,
                  "; etp values that work: ", divisors_of_all({{"moe.ffn", c.moe.ffn}}));
  }
  const int64_t n_layers = static_cast<int64_t>(layers.size());
  const int64_t cuts = static_cast<int64_t>(std::count(c.pattern.begin(), c.pattern.end(), '|'));
  const int pieces = l.pp * l.virtual_stages;
  const std::string what =
      l.virtual_stages == 1 ? "parallel.pp" : "parallel.pp x parallel.virtual_stages";
  BRAID_REQUIRE(pieces <= n_layers, what, " = ", pieces, " exceeds the ", n_layers,
                " layers of model.pattern");
  BRAID_REQUIRE(cuts == 0 || pieces == cuts + 1, "model.pattern cuts ", cuts + 1,
                " pipeline stages with '|', but ", what, " = ", pieces,
                " (set parallel.pp = ", cuts + 1, " or remove the cuts)");
}

std::vector<int64_t> Model::stage_starts(const ModelConfig& cfg, int stages,
                                         const std::vector<double>& costs) {
  const int64_t l = static_cast<int64_t>(pattern_layers(cfg.pattern).size());
  BRAID_REQUIRE(stages >= 1 && stages <= l, "parallel.pp = ", stages, " must be in [1, ", l,
                "] (the layers of model.pattern)");
  std::vector<int64_t> starts{0};
  if (cfg.pattern.find('|') != std::string::npos) {  // the pattern's own cuts
    int64_t layer = 0;
    for (char c : cfg.pattern)
      if (c == '|')
        starts.push_back(layer);
      else
        ++layer;
    BRAID_REQUIRE(
        static_cast<int>(starts.size()) == stages, "model.pattern cuts ", starts.size(),
        " pipeline pieces with '|', but parallel.pp x parallel.virtual_stages = ", stages);
    for (size_t s = 1; s < starts.size(); ++s)
      BRAID_REQUIRE(starts[s] > starts[s - 1] && starts[s] < l, "model.pattern '", cfg.pattern,
                    "': pipeline stage ", s - 1, " has no layers");
    return starts;
  }
  if (!costs.empty()) {
    BRAID_CHECK(static_cast<int64_t>(costs.size()) == l, "stage_starts: ", costs.size(),
                " layer costs for ", l, " layers");
    const std::vector<int> first = balance_stages(costs, stages);
    return std::vector<int64_t>(first.begin(), first.end());
  }
  for (int s = 1; s < stages; ++s) starts.push_back(s * l / stages);  // as even as the layers go
  return starts;
}

Recompute parse_recompute(const std::string& s) {
  if (s == "none") return Recompute::none;
  if (s == "ssm") return Recompute::ssm;
  if (s == "full") return Recompute::full;
  BRAID_FAIL("train.recompute = '", s, "' must be none, ssm (the Mamba mixers) or full");
}

std::vector<double> Model::layer_costs(const ModelConfig& cfg, Backend& backend, DType dtype,
                                       int64_t batch, int64_t seq) {
  const std::string layers = pattern_layers(cfg.pattern);
  Arena arena =
      Arena::allocate("cost_batch", backend, 4 * (size_t(batch * seq) * 4 + Arena::kAlign));
  const Batch in{arena.take("tokens", DType::i32, {batch, seq}),
                 arena.take("targets", DType::i32, {batch, seq}),
                 arena.take("seq_idx", DType::i32, {batch, seq}),
                 arena.take("positions", DType::i32, {batch, seq})};
  for (const Tensor* t : {&in.tokens, &in.targets, &in.seq_idx}) backend.fill(*t, 1.0, {});
  std::vector<int32_t> positions(size_t(batch * seq));
  for (int64_t i = 0; i < batch * seq; ++i) positions[i] = int32_t(i % seq);
  backend.copy(in.positions.data, backend.device(), positions.data(), Device::cpu,
               in.positions.nbytes(), {});
  auto seconds = [&](const std::string& pattern) {
    ModelConfig c = cfg;
    c.pattern = pattern;
    Model m(c, dtype, backend, batch, seq);
    m.initialize(1);
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      m.forward_backward(in, 1.0, 1.0);
      backend.synchronize({});
      best = std::min(best,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  std::map<char, double> per_type, one_layer;
  for (char c : layers)
    if (!per_type.count(c)) {
      one_layer[c] = seconds(std::string(1, c));
      per_type[c] = std::max(seconds(std::string(2, c)) - one_layer[c], 1e-9);
    }
  std::vector<double> out;
  for (char c : layers) out.push_back(per_type[c]);
  // The model's ends (embedding, final norm, logits and loss: a one-layer model less its layer)
  // count with the last layer, on the last stage with the logits and the loss that dominate them.
  out.back() += std::max(one_layer[layers[0]] - per_type[layers[0]], 0.0);
  return out;
}

Model::Model(const ModelConfig& cfg, DType dtype, Backend& backend, int64_t batch, int64_t seq,
             int64_t pad_elems, const TensorParallel& tp, Communicator* cp, Communicator* ep,
             int64_t expert_pad_elems, int stage, const std::vector<int64_t>& starts,
             Recompute recompute, int activation_slots)
    : cfg_(cfg), backend_(&backend), tp_(tp), cp_(cp), act_dtype_(dtype), b_(batch), t_(seq) {
  validate_model_config(cfg_);
  const bool gpu = backend.device() == Device::cuda;
  if (gpu) gemm_ = std::make_unique<GemmContext>(backend);
  // Mixed precision: bf16 activations and compute copies of the weights, f32 parameters and
  // gradients (the optimizer's master weights are the f32 values).
  const DType pdt = dtype == DType::bf16 ? DType::f32 : dtype;
  BRAID_REQUIRE(batch > 0 && seq > 0, "microbatch [", batch, ",", seq, "] must be non-empty");
  layers_ = pattern_layers(cfg_.pattern);
  BRAID_REQUIRE(cfg_.vocab_size % tp.size() == 0, "parallel.tp = ", tp.size(),
                " must divide model.vocab_size = ", cfg_.vocab_size);
  vocab_start_ = tp.rank() * (cfg_.vocab_size / tp.size());
  sp_ = tp.split_rows();
  BRAID_REQUIRE(!sp_ || batch * seq % tp.size() == 0, "parallel.sequence_parallel: the ",
                batch * seq, " tokens of a microbatch do not split over tp = ", tp.size(),
                " ranks");
  const int64_t d = cfg_.d_model, l = static_cast<int64_t>(layers_.size());
  const int stages = static_cast<int>(starts.size());
  BRAID_CHECK(stage >= 0 && stage < stages && starts[0] == 0, "Model: stage ", stage, " of ",
              stages);
  first_ = stage == 0, last_ = stage == stages - 1;
  layer0_ = starts[stage];
  const int64_t layer_end = last_ ? l : starts[stage + 1];
  const double std = cfg_.init_std, out_std = std / std::sqrt(double(l));
  // The parameters of the first stage (embeddings), of layer i, and of the last stage (final norm
  // and output projection; with tied embeddings the last stage of several holds a mirror of the
  // embedding table, kept equal to the first stage's by summing their gradients).
  auto add_embeddings = [&](ParamSet& ps, bool mirror) {
    Param* e = ps.add("embeddings.weight", {cfg_.vocab_size, d}, {ParamInit::Kind::normal, std},
                      true, true, tp.shard(0));
    e->mirror = mirror;
    return e;
  };
  auto add_layer = [&](ParamSet& ps, int64_t i, std::vector<std::unique_ptr<Block>>& blocks,
                       std::vector<Param*>& norms, std::vector<MoeBlock*>& moes) {
    const std::string p = "layers." + std::to_string(i);
    norms.push_back(ps.add(p + ".norm.weight", {d}, {ParamInit::Kind::constant, 1.0}, false));
    const std::string mp = p + ".mixer";
    switch (layers_[i]) {
      case 'S': {
        Mamba1Config m = cfg_.mamba1;
        m.d_model = d;
        blocks.push_back(std::make_unique<Mamba1Mixer>(m, ps, mp, std, out_std, tp, cp != nullptr));
        break;
      }
      case 'M': {
        Mamba2Config m = cfg_.mamba2;
        m.d_model = d;
        blocks.push_back(std::make_unique<Mamba2Mixer>(m, ps, mp, std, out_std, tp, cp != nullptr));
        break;
      }
      case '*': {
        AttentionConfig a = cfg_.attention;
        a.d_model = d;
        blocks.push_back(std::make_unique<AttentionBlock>(a, ps, mp, std, out_std, tp));
        break;
      }
      case '-':
        blocks.push_back(
            std::make_unique<MlpBlock>(MlpConfig{d, cfg_.mlp.ffn}, ps, mp, std, out_std, tp));
        break;
      case 'E': {
        MoeConfig m = cfg_.moe;
        m.d_model = d;
        auto blk = std::make_unique<MoeBlock>(m, ps, mp, std, out_std, tp, ep);
        moes.push_back(blk.get());
        blocks.push_back(std::move(blk));
        break;
      }
    }
  };
  auto add_last = [&](ParamSet& ps) {
    Param* norm = ps.add("norm_f.weight", {d}, {ParamInit::Kind::constant, 1.0}, false);
    Param* head = cfg_.tie_embeddings
                      ? nullptr
                      : ps.add("lm_head.weight", {cfg_.vocab_size, d},
                               {ParamInit::Kind::normal, std}, true, true, tp.shard(0));
    return std::pair{norm, head};
  };
  if (first_ || (last_ && cfg_.tie_embeddings)) embed_ = add_embeddings(params_, !first_);
  for (int64_t i = layer0_; i < layer_end; ++i) add_layer(params_, i, blocks_, norms_, moe_blocks_);
  if (last_) std::tie(norm_f_, head_) = add_last(params_);
  // What the other stages (and the other expert-parallel ranks) hold, registered into a scratch
  // set only to name it: a loader names every tensor of the model.
  {
    ParamSet others;
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<Param*> norms;
    std::vector<MoeBlock*> moes;
    if (!first_ && !(last_ && cfg_.tie_embeddings)) add_embeddings(others, false);
    for (int64_t i = 0; i < l; ++i)
      if (i < layer0_ || i >= layer_end) add_layer(others, i, blocks, norms, moes);
    if (!last_) add_last(others);
    for (const Param& p : others.all()) remote_.push_back({p.name, p.global_shape, p.trainable});
    for (const std::vector<MoeBlock*>* set : {&moes, &moe_blocks_})
      for (const MoeBlock* m : *set)
        for (RemoteParam& r : m->remote_params()) remote_.push_back(std::move(r));
  }
  params_.allocate(backend, pdt, pad_elems, expert_pad_elems, dtype);

  // Memory plan: a measuring pass over the same set-up, then one allocation per arena. Each
  // block's scratch starts at the same offset (blocks run one at a time).
  BRAID_CHECK(activation_slots >= 1, "Model: ", activation_slots, " activation slots");
  slots_ = activation_slots;
  const int64_t m = batch * seq, nl = static_cast<int64_t>(blocks_.size());  // this stage's layers
  for (int64_t i = 0; i < nl; ++i) {
    const char c = layers_[layer0_ + i];
    // With several slots a block whose backward reads host state of its own forward (MoE) runs
    // that forward again before its backward, as recomputed blocks do.
    recompute_.push_back(recompute == Recompute::full ||
                         (recompute == Recompute::ssm && (c == 'S' || c == 'M')) ||
                         (slots_ > 1 && blocks_[i]->forward_state_on_host()));
  }
  // The output projection and loss run over row chunks of the logits: all rows at once on the
  // CPU; on the GPU chunks of about 256 MiB of logits, so the whole [M,V] is never held.
  const int64_t v = cfg_.vocab_size / tp.size();
  head_rows_ = gpu ? std::clamp<int64_t>((int64_t(256) << 20) / (2 * v), 1, m) : m;
  Arena plan_state = Arena::measuring("block_state", backend.device());
  for (auto& blk : blocks_) blk->plan_state(plan_state);
  state_ =
      Arena::allocate("block_state", backend, std::max(plan_state.high_water(), Arena::kAlign));
  for (auto& blk : blocks_) blk->plan_state(state_);
  backend.fill(state_.bytes(), 0.0, {});  // persistent counters (MoE step counts) start at zero
  Arena plan_saved = Arena::measuring("activations", backend.device());
  Arena plan_scratch = Arena::measuring("scratch", backend.device());
  plan_activations(plan_saved, plan_scratch);
  slot_bytes_ = plan_saved.high_water();  // a multiple of Arena::kAlign, as every take is
  saved_ = Arena::allocate("activations", backend, slot_bytes_ * slots_);
  scratch_ = Arena::allocate("scratch", backend, plan_scratch.high_water());
  backend.fill(saved_.bytes(), 0.0, {});
  slot_ = -1;
  use_activations(0);
}

void Model::use_activations(int slot) {
  BRAID_CHECK(slot >= 0 && slot < slots_, "Model: activation slot ", slot, " of ", slots_);
  if (slot == slot_) return;
  Arena sv = Arena::view("activations", saved_.device(),
                         static_cast<char*>(saved_.bytes().data) + size_t(slot) * slot_bytes_,
                         slot_bytes_);
  Arena sc = Arena::view("scratch", scratch_.device(), scratch_.bytes().data, scratch_.capacity());
  plan_activations(sv, sc);
  slot_ = slot;
}

void Model::plan_activations(Arena& sv, Arena& sc) {
  const bool gpu = gemm_ != nullptr;
  const DType dtype = act_dtype_, pdt = dtype == DType::bf16 ? DType::f32 : dtype;
  const int64_t m = b_ * t_, d = cfg_.d_model, v = cfg_.vocab_size / tp_.size();
  const int64_t mr = sp_ ? m / tp_.size() : m;  // rows of the residual stream on this rank
  const int64_t nl = static_cast<int64_t>(blocks_.size());
  resid_.clear(), normed_.clear(), rstd_.clear();
  for (int64_t i = 0; i <= nl; ++i)
    resid_.push_back(sv.take("resid." + std::to_string(i), dtype, {mr, d}));
  for (int64_t i = 0; i < nl; ++i) {
    normed_.push_back(sv.take("normed." + std::to_string(i), dtype, {mr, d}));
    rstd_.push_back(sv.take("rstd." + std::to_string(i), pdt, {mr}));
  }
  if (last_) {
    final_normed_ = sv.take("final_normed", dtype, {m, d});
    final_rstd_ = sv.take("final_rstd", pdt, {mr});
    if (sp_) final_local_ = sv.take("final_local", dtype, {mr, d});
    logits_ = sc.take("logits", dtype, {head_rows_, v});
    if (gpu) row_loss_ = sv.take("row_loss", DType::f32, {m, 2});
    if (gpu && tp_.size() > 1) ce_stats_ = sc.take("ce_stats", DType::f32, {4, head_rows_});
  }

  dresid_ = sc.take("dresid", dtype, {mr, d});
  dnormed_ = sc.take("dnormed", dtype, {mr, d});
  dtmp_ = sc.take("dtmp", dtype, {mr, d});
  norm_ws_ = sc.take("norm_workspace", pdt, {rmsnorm_workspace_elems(dresid_)});
  if (first_) {  // the backward's workspace (the tokens' shape and device are what count)
    const Tensor tokens =
        Tensor::contiguous_view(nullptr, DType::i32, backend_->device(), {b_, t_}, "tokens");
    embed_ws_ = sc.take("embedding_workspace", DType::u8,
                        {embedding_workspace_bytes(tokens, embed_->value.size(0))});
  }
  fout_ = sc.take("block_out", dtype, {b_, t_, d});
  if (sp_) {
    xfull_ = sc.take("block_in", dtype, {b_, t_, d});
    dxfull_ = sc.take("block_dx", dtype, {b_, t_, d});
  }
  // Kept blocks' saved tensors first; the recomputed blocks' then all start at one offset.
  const size_t base = sc.mark();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (recompute_[i]) continue;
    sc.reset(base);
    blocks_[i]->plan(sv, sc, b_, t_);
  }
  // (The arena's high-water mark covers the largest of them: nothing is taken after.)
  const size_t shared = sv.mark();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (!recompute_[i]) continue;
    sc.reset(base);
    sv.reset(shared);
    blocks_[i]->plan(sv, sc, b_, t_);
  }
}

// Under sequence parallelism: full = the rows of every rank (all-gather), rows = this rank's
// rows of the sum over the ranks (reduce-scatter).
namespace {
const Tensor& gather(const TensorParallel& tp, const Tensor& rows, const Tensor& full) {
  tp.group->all_gather(rows, full);
  return full;
}
void scatter_sum(const TensorParallel& tp, const Tensor& full, const Tensor& rows) {
  tp.group->reduce_scatter(full, rows, ReduceOp::sum);
}
}  // namespace

void Model::forward(const Batch& batch, const BatchMeta& meta, const Tensor* input) {
  check_shape(batch.tokens, {b_, t_});
  const int64_t m = b_ * t_, d = cfg_.d_model;
  auto bt = [&](const Tensor& x) { return x.reshape({b_, t_, d}); };
  if (first_) {
    // Vocabulary-parallel lookup: each rank fills its rows of the vocabulary, the sum is the
    // lookup.
    embedding_forward(batch.tokens, embed_->compute, sp_ ? fout_ : bt(resid_[0]), vocab_start_,
                      cfg_.vocab_size);
    if (sp_)
      scatter_sum(tp_, fout_, resid_[0]);
    else
      tp_.sum(resid_[0]);
  } else {
    BRAID_CHECK(input, "Model: a later pipeline stage needs its input activations");
    copy_tensor(*backend_, resid_[0], *input);
  }
  // Without sequence parallelism the residual add is fused with the next norm (the next layer's,
  // or the final one): x_{l+1} = x_l + f_l and its norm in one pass.
  const bool fuse = !sp_;
  const size_t n = blocks_.size();
  for (size_t i = 0; i < n; ++i) {
    if (!fuse || i == 0)
      rmsnorm_forward(resid_[i], norms_[i]->value, cfg_.norm_eps, normed_[i], rstd_[i]);
    blocks_[i]->forward(sp_ ? gather(tp_, normed_[i], xfull_) : bt(normed_[i]), fout_, meta);
    if (sp_) scatter_sum(tp_, fout_, dtmp_);  // this rank's rows of the block's output
    const Tensor out = sp_ ? dtmp_ : fout_.reshape({m, d});
    if (fuse && i + 1 < n) {
      add_rmsnorm_forward(resid_[i], out, norms_[i + 1]->value, cfg_.norm_eps, resid_[i + 1],
                          normed_[i + 1], rstd_[i + 1]);
    } else if (fuse && last_) {
      add_rmsnorm_forward(resid_[i], out, norm_f_->value, cfg_.norm_eps, resid_[i + 1],
                          final_normed_, final_rstd_);
    } else {
      copy_tensor(*backend_, resid_[i + 1], resid_[i]);
      add_into(resid_[i + 1], out);
    }
  }
  if (!last_) return;
  if (!fuse || n == 0)
    rmsnorm_forward(resid_.back(), norm_f_->value, cfg_.norm_eps,
                    sp_ ? final_local_ : final_normed_, final_rstd_);
  if (sp_) gather(tp_, final_local_, final_normed_);
}

BatchMeta Model::step_meta(const Batch& batch, double aux_scale) const {
  BatchMeta meta{&batch.seq_idx, &batch.positions, aux_scale, cp_};
  meta.gemm = gemm_.get();
  return meta;
}

Model::StepResult Model::forward_backward(const Batch& batch, double grad_scale, double aux_scale,
                                          const Tensor* input, const Tensor* output_grad,
                                          const Tensor* input_grad) {
  const BatchMeta meta = step_meta(batch, aux_scale);
  forward(batch, meta, input);
  return backward(batch, meta, grad_scale, output_grad, input_grad);
}

void Model::forward_for_backward(const Batch& batch, double aux_scale, const Tensor* input) {
  BRAID_CHECK(!last_, "Model: the last pipeline stage runs its forward with its backward");
  forward(batch, step_meta(batch, aux_scale), input);
}

Model::StepResult Model::backward_after_forward(const Batch& batch, double grad_scale,
                                                double aux_scale, const Tensor* output_grad,
                                                const Tensor* input_grad) {
  BRAID_CHECK(!last_, "Model: the last pipeline stage runs its forward with its backward");
  return backward(batch, step_meta(batch, aux_scale), grad_scale, output_grad, input_grad);
}

Model::StepResult Model::backward(const Batch& batch, const BatchMeta& meta, double grad_scale,
                                  const Tensor* output_grad, const Tensor* input_grad) {
  StepResult r;
  const int64_t m = b_ * t_, d = cfg_.d_model;
  auto bt = [&](const Tensor& x) { return x.reshape({b_, t_, d}); };
  if (last_) {
    const Tensor dfinal = sp_ ? dxfull_.reshape({m, d}) : dtmp_;  // partial over the tp ranks
    r.loss = head(batch, grad_scale, &dfinal, false);
    if (sp_)
      scatter_sum(tp_, dfinal, dtmp_);
    else
      tp_.sum(dfinal);
    rmsnorm_backward(resid_.back(), norm_f_->value, final_rstd_, dtmp_, dresid_, norm_f_->grad,
                     &norm_ws_);
  } else {
    BRAID_CHECK(output_grad, "Model: an earlier pipeline stage needs its output's gradient");
    copy_tensor(*backend_, dresid_, *output_grad);
  }
  for (size_t i = blocks_.size(); i-- > 0;) {
    if (recompute_[i]) {  // its saved activations, again (routing not counted twice)
      BatchMeta again = meta;
      again.count_routing = false;
      blocks_[i]->forward(sp_ ? gather(tp_, normed_[i], xfull_) : bt(normed_[i]), fout_, again);
    }
    if (sp_) {
      blocks_[i]->backward(gather(tp_, normed_[i], xfull_), gather(tp_, dresid_, fout_), dxfull_,
                           meta);
      scatter_sum(tp_, dxfull_, dnormed_);
    } else {
      blocks_[i]->backward(bt(normed_[i]), bt(dresid_), bt(dnormed_), meta);
    }
    rmsnorm_backward(resid_[i], norms_[i]->value, rstd_[i], dnormed_, dresid_, norms_[i]->grad,
                     &norm_ws_, nullptr, true);  // dresid += the norm's input gradient
    // Layer i's parameters start with its norm; later layers and the head come after it.
    if (grads_ready_) grads_ready_(params_.region_offset(*norms_[i]));
  }
  if (first_) {
    embedding_backward(batch.tokens, sp_ ? gather(tp_, dresid_, fout_) : bt(dresid_), embed_->grad,
                       vocab_start_, cfg_.vocab_size, &embed_ws_);
    if (grads_ready_) grads_ready_(0);
  } else {
    BRAID_CHECK(input_grad, "Model: a later pipeline stage returns its input's gradient");
    copy_tensor(*backend_, *input_grad, dresid_);
  }
  // Read last, once the whole step is queued (GPU: the one wait of the step besides the MoE
  // layers' row counts): the loss and the auxiliary losses.
  if (last_ && gemm_) r.loss = read_row_losses(row_loss_);
  for (auto& blk : blocks_) r.aux += blk->aux_loss();
  return r;
}

void Model::reduce_sequence_parallel_grads() {
  if (!sp_) return;
  for (Param* p : norms_) tp_.sum(p->grad);
  if (norm_f_) tp_.sum(norm_f_->grad);
}

LossSum Model::head(const Batch& batch, double grad_scale, const Tensor* dfinal, bool read) {
  const int64_t m = b_ * t_;
  const Tensor targets = batch.targets.reshape({m});
  const Param* w = head_ ? head_ : embed_;
  LossSum total;
  for (int64_t r0 = 0; r0 < m; r0 += head_rows_) {
    const int64_t n = std::min(head_rows_, m - r0);
    const Tensor x = final_normed_.slice(0, r0, n), logits = logits_.slice(0, 0, n),
                 tg = targets.slice(0, r0, n);
    linear_forward(x, w->compute, nullptr, logits, gemm_.get());
    // The logits receive their own gradient (each row is read before it is written).
    const Tensor* dlogits = dfinal ? &logits : nullptr;
    if (gemm_ && tp_.size() > 1) {
      cross_entropy_rows_vocab_parallel(
          logits, tg, dlogits, grad_scale, row_loss_.slice(0, r0, n), vocab_start_, cfg_.vocab_size,
          *tp_.group,
          Tensor::contiguous_view(ce_stats_.data, DType::f32, Device::cuda, {4, n}, "ce_stats"));
    } else if (gemm_) {
      cross_entropy_rows(logits, tg, dlogits, grad_scale, row_loss_.slice(0, r0, n));
    } else {
      const LossSum l =
          tp_.size() == 1 ? cross_entropy(logits, tg, dlogits, grad_scale)
                          : cross_entropy_vocab_parallel(logits, tg, dlogits, grad_scale,
                                                         vocab_start_, cfg_.vocab_size, *tp_.group);
      total.sum += l.sum, total.count += l.count;
    }
    if (dfinal) {
      const Tensor dx = dfinal->slice(0, r0, n);
      linear_backward(x, w->compute, logits, &dx, w->grad, nullptr, gemm_.get());
    }
  }
  return gemm_ && read ? read_row_losses(row_loss_) : total;
}

LossSum Model::evaluate(const Batch& batch, const Tensor* input) {
  BatchMeta meta = step_meta(batch, 0.0);
  meta.count_routing = false;
  forward(batch, meta, input);
  return last_ ? head(batch, 0.0, nullptr) : LossSum{};
}

void Model::after_optimizer_step() {
  for (MoeBlock* b : moe_blocks_) b->after_optimizer_step();
}

std::vector<Tensor> Model::moe_step_counts() const {
  std::vector<Tensor> out;
  for (const MoeBlock* b : moe_blocks_) out.push_back(b->step_counts());
  return out;
}

MemoryReport Model::memory() const {
  return {params_.value_bytes() + params_.compute_bytes(), params_.grad_bytes(), saved_.capacity(),
          scratch_.capacity() + (gemm_ ? gemm_->workspace_bytes() : 0)};
}

double Model::flops_per_token(int64_t seq) const {
  const double d = cfg_.d_model, v = cfg_.vocab_size;
  double f = last_ ? 6 * d * v : 0;  // output projection, forward + backward
  for (const auto& blk : blocks_) f += blk->flops_per_token(seq);
  return f;
}

}  // namespace braid
