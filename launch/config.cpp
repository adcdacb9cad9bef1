#include "launch/config.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <functional>
#include <map>
#include <sstream>

#include "runtime/check.h"

namespace braid {
namespace {

// A value as text (a YAML scalar, or a flow sequence for lists) with where it came from.
struct Value {
  std::string text;
  std::vector<std::string> list;
  bool is_list = false;
  std::string where;
};

[[noreturn]] void bad(const Value& v, const std::string& key, const std::string& what) {
  BRAID_REJECT(v.where, ": ", key, ": ", what, ", got '", v.is_list ? std::string("[...]") : v.text,
               "'");
}

int64_t as_int(const Value& v, const std::string& key) {
  char* end = nullptr;
  const long long x = std::strtoll(v.text.c_str(), &end, 10);
  if (v.is_list || v.text.empty() || *end != '\0') bad(v, key, "expected an integer");
  return x;
}
double as_double(const Value& v, const std::string& key) {
  if (v.text == "inf" || v.text == ".inf") return std::numeric_limits<double>::infinity();
  char* end = nullptr;
  const double x = std::strtod(v.text.c_str(), &end);
  if (v.is_list || v.text.empty() || *end != '\0' || std::isnan(x))
    bad(v, key, "expected a number");
  return x;
}
bool as_bool(const Value& v, const std::string& key) {
  if (v.text == "true") return true;
  if (v.text == "false") return false;
  bad(v, key, "expected true or false");
}

struct Key {
  std::function<void(RunConfig&, const Value&, const std::string&)> set;
  std::function<std::string(const RunConfig&)> get;
};

std::string num(double x) {
  if (std::isinf(x)) return "inf";
  std::ostringstream os;
  os.precision(10);
  os << x;
  return os.str();
}

// Registry helpers binding a key to a member reached through `f`.
template <typename F>
Key int_key(F f, int64_t lo) {
  return {[f, lo](RunConfig& c, const Value& v, const std::string& k) {
            const int64_t x = as_int(v, k);
            if (x < lo) bad(v, k, "must be at least " + std::to_string(lo));
            f(c) = static_cast<std::remove_reference_t<decltype(f(c))>>(x);
          },
          [f](const RunConfig& c) { return std::to_string(f(const_cast<RunConfig&>(c))); }};
}
template <typename F>
Key double_key(F f) {
  return {[f](RunConfig& c, const Value& v, const std::string& k) { f(c) = as_double(v, k); },
          [f](const RunConfig& c) { return num(f(const_cast<RunConfig&>(c))); }};
}
template <typename F>
Key bool_key(F f) {
  return {[f](RunConfig& c, const Value& v, const std::string& k) { f(c) = as_bool(v, k); },
          [f](const RunConfig& c) {
            return std::string(f(const_cast<RunConfig&>(c)) ? "true" : "false");
          }};
}
template <typename F>
Key string_key(F f) {
  return {[f](RunConfig& c, const Value& v, const std::string& k) {
            if (v.is_list) bad(v, k, "expected a single value");
            f(c) = v.text;
          },
          [f](const RunConfig& c) { return "\"" + f(const_cast<RunConfig&>(c)) + "\""; }};
}
template <typename F>
Key list_key(F f) {
  return {[f](RunConfig& c, const Value& v, const std::string&) {
            f(c) = v.is_list ? v.list : std::vector<std::string>{v.text};
          },
          [f](const RunConfig& c) {
            std::string s = "[";
            for (const auto& x : f(const_cast<RunConfig&>(c)))
              s += (s.size() > 1 ? ", \"" : "\"") + x + "\"";
            return s + "]";
          }};
}

#define M(expr)                \
  [](RunConfig & c) -> auto& { \
    return c.expr;             \
  }

const std::map<std::string, Key>& registry() {
  static const std::map<std::string, Key> keys = {
      {"model.pattern", string_key(M(model.pattern))},
      {"model.d_model", int_key(M(model.d_model), 1)},
      {"model.vocab_size", int_key(M(model.vocab_size), 1)},
      {"model.tie_embeddings", bool_key(M(model.tie_embeddings))},
      {"model.norm_eps", double_key(M(model.norm_eps))},
      {"model.init_std", double_key(M(model.init_std))},
      {"mamba1.expand", int_key(M(mamba1_expand), 1)},
      {"mamba1.d_state", int_key(M(model.mamba1.d_state), 1)},
      {"mamba1.dt_rank", int_key(M(model.mamba1.dt_rank), 0)},
      {"mamba1.d_conv", int_key(M(model.mamba1.d_conv), 1)},
      {"mamba1.groups", int_key(M(model.mamba1.groups), 1)},
      {"mamba1.dt_bc_norm", bool_key(M(model.mamba1.dt_bc_norm))},
      {"mamba1.dt_min", double_key(M(model.mamba1.dt_min))},
      {"mamba1.dt_max", double_key(M(model.mamba1.dt_max))},
      {"mamba2.expand", int_key(M(mamba2_expand), 1)},
      {"mamba2.heads", int_key(M(model.mamba2.heads), 0)},
      {"mamba2.head_dim", int_key(M(model.mamba2.head_dim), 1)},
      {"mamba2.groups", int_key(M(model.mamba2.groups), 1)},
      {"mamba2.d_state", int_key(M(model.mamba2.d_state), 1)},
      {"mamba2.d_conv", int_key(M(model.mamba2.d_conv), 1)},
      {"mamba2.chunk", int_key(M(model.mamba2.chunk), 1)},
      {"mamba2.dt_min", double_key(M(model.mamba2.dt_min))},
      {"mamba2.dt_max", double_key(M(model.mamba2.dt_max))},
      {"mamba2.dt_limit_min", double_key(M(model.mamba2.dt_limit_min))},
      {"mamba2.dt_limit_max", double_key(M(model.mamba2.dt_limit_max))},
      {"attention.heads", int_key(M(model.attention.heads), 1)},
      {"attention.kv_heads", int_key(M(model.attention.kv_heads), 0)},
      {"attention.head_dim", int_key(M(model.attention.head_dim), 0)},
      {"attention.rope", bool_key(M(model.attention.rope))},
      {"attention.rope_theta", double_key(M(model.attention.rope_theta))},
      {"mlp.ffn", int_key(M(model.mlp.ffn), 1)},
      {"moe.experts", int_key(M(model.moe.experts), 1)},
      {"moe.top_k", int_key(M(model.moe.top_k), 1)},
      {"moe.ffn", int_key(M(model.moe.ffn), 1)},
      {"moe.shared_ffn", int_key(M(model.moe.shared_ffn), 0)},
      {"moe.score",
       {[](RunConfig& c, const Value& v, const std::string& k) {
          if (v.text == "softmax")
            c.model.moe.score = RouterScore::softmax;
          else if (v.text == "sigmoid")
            c.model.moe.score = RouterScore::sigmoid;
          else
            bad(v, k, "expected softmax or sigmoid");
        },
        [](const RunConfig& c) {
          return std::string(c.model.moe.score == RouterScore::softmax ? "softmax" : "sigmoid");
        }}},
      {"moe.normalize_topk", bool_key(M(model.moe.normalize_topk))},
      {"moe.capacity_factor", double_key(M(model.moe.capacity_factor))},
      {"moe.aux_loss_coef", double_key(M(model.moe.aux_loss_coef))},
      {"moe.z_loss_coef", double_key(M(model.moe.z_loss_coef))},
      {"moe.balance_bias", bool_key(M(model.moe.balance_bias))},
      {"moe.bias_update_rate", double_key(M(model.moe.bias_update_rate))},
      {"parallel.tp", int_key(M(parallel.tp), 1)},
      {"parallel.cp", int_key(M(parallel.cp), 1)},
      {"parallel.dp", int_key(M(parallel.dp), 0)},
      {"parallel.pp", int_key(M(parallel.pp), 1)},
      {"parallel.ep", int_key(M(parallel.ep), 1)},
      {"parallel.etp", int_key(M(parallel.etp), 1)},
      {"parallel.order", string_key(M(parallel.order))},
      {"parallel.sequence_parallel", bool_key(M(parallel.sequence_parallel))},
      {"parallel.stage_starts", string_key(M(parallel.stage_starts))},
      {"parallel.virtual_stages", int_key(M(parallel.virtual_stages), 1)},
      {"parallel.grad_bucket_mb", double_key(M(parallel.grad_bucket_mb))},
      {"train.steps", int_key(M(train.steps), 1)},
      {"train.micro_batch", int_key(M(train.micro_batch), 1)},
      {"train.seq_len", int_key(M(train.seq_len), 1)},
      {"train.grad_accum", int_key(M(train.grad_accum), 1)},
      {"train.seed", int_key(M(train.seed), 0)},
      {"train.log_interval", int_key(M(train.log_interval), 1)},
      {"train.eval_interval", int_key(M(train.eval_interval), 1)},
      {"train.eval_batches", int_key(M(train.eval_batches), 1)},
      {"train.threads", int_key(M(train.threads), 0)},
      {"train.device", string_key(M(train.device))},
      {"train.precision", string_key(M(train.precision))},
      {"train.recompute", string_key(M(train.recompute))},
      {"train.out_dir", string_key(M(train.out_dir))},
      {"checkpoint.dir", string_key(M(checkpoint.dir))},
      {"checkpoint.interval", int_key(M(checkpoint.interval), 0)},
      {"checkpoint.save_final", bool_key(M(checkpoint.save_final))},
      {"checkpoint.keep", int_key(M(checkpoint.keep), 1)},
      {"checkpoint.keep_every", int_key(M(checkpoint.keep_every), 0)},
      {"checkpoint.resume", bool_key(M(checkpoint.resume))},
      {"checkpoint.async", bool_key(M(checkpoint.async))},
      {"checkpoint.max_attempts", int_key(M(checkpoint.max_attempts), 1)},
      {"data.train", list_key(M(data.train))},
      {"data.valid", list_key(M(data.valid))},
      {"optim.lr", double_key(M(lr.peak))},
      {"optim.min_lr", double_key(M(lr.min))},
      {"optim.schedule",
       {[](RunConfig& c, const Value& v, const std::string& k) {
          if (!lr_kind_from_name(v.text, &c.lr.kind)) bad(v, k, "expected cosine, wsd or constant");
        },
        [](const RunConfig& c) { return std::string(lr_kind_name(c.lr.kind)); }}},
      {"optim.warmup", int_key(M(lr.warmup), 0)},
      {"optim.decay_steps", int_key(M(lr.decay), 0)},
      {"optim.beta1", double_key(M(adamw.beta1))},
      {"optim.beta2", double_key(M(adamw.beta2))},
      {"optim.eps", double_key(M(adamw.eps))},
      {"optim.weight_decay", double_key(M(adamw.weight_decay))},
      {"optim.grad_clip", double_key(M(adamw.grad_clip))},
  };
  return keys;
}
#undef M

void set_key(RunConfig& c, const std::string& key, const Value& v) {
  const auto& reg = registry();
  auto it = reg.find(key);
  if (it == reg.end()) {
    std::string section = key.substr(0, key.find('.')), known;
    for (const auto& [k, _] : reg)
      if (k.rfind(section + ".", 0) == 0) known += (known.empty() ? "" : ", ") + k;
    BRAID_REJECT(v.where, ": unknown key '", key, "'",
                 known.empty() ? std::string(" (unknown section)") : " (known: " + known + ")");
  }
  it->second.set(c, v, key);
}

void load_node(RunConfig& c, const YAML::Node& node, const std::string& prefix,
               const std::string& file) {
  for (const auto& kv : node) {
    const std::string key =
        prefix.empty() ? kv.first.as<std::string>() : prefix + "." + kv.first.as<std::string>();
    const std::string where = file + ":" + std::to_string(kv.first.Mark().line + 1);
    const YAML::Node& v = kv.second;
    if (v.IsMap()) {
      BRAID_REQUIRE(prefix.empty(), where, ": '", key, "' is nested too deeply (use section.key)");
      load_node(c, v, key, file);
    } else if (v.IsSequence()) {
      Value val{"", {}, true, where};
      for (const auto& e : v) {
        BRAID_REQUIRE(e.IsScalar(), where, ": ", key, ": list entries must be plain values");
        val.list.push_back(e.as<std::string>());
      }
      set_key(c, key, val);
    } else if (v.IsScalar()) {
      set_key(c, key, Value{v.as<std::string>(), {}, false, where});
    } else {
      BRAID_REJECT(where, ": ", key, ": has no value");
    }
  }
}

}  // namespace

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  RunConfig c;
  c.model.pattern = "";
  c.parallel.dp = 0;  // by default, the ranks left over after tp, cp and pp
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    BRAID_REJECT(path, ": cannot open the config file");
  } catch (const YAML::Exception& e) {
    BRAID_REJECT(path, ":", e.mark.line + 1, ": not valid YAML: ", e.msg);
  }
  BRAID_REQUIRE(root.IsMap(), path, ": the config must be a map of sections (model:, train:, ...)");
  load_node(c, root, "", path);
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    BRAID_REQUIRE(eq != std::string::npos && eq > 0, "command line: override '", o,
                  "' is not key=value");
    Value v{o.substr(eq + 1), {}, false, "command line '" + o + "'"};
    if (v.text.size() >= 2 && v.text.front() == '[' && v.text.back() == ']') {
      v.is_list = true;
      std::stringstream ss(v.text.substr(1, v.text.size() - 2));
      for (std::string item; std::getline(ss, item, ',');) {
        item.erase(0, item.find_first_not_of(' '));
        item.erase(item.find_last_not_of(' ') + 1);
        if (!item.empty()) v.list.push_back(item);
      }
    }
    set_key(c, o.substr(0, eq), v);
  }
  // Derived sizes.
  ModelConfig& m = c.model;
  m.mamba1.d_inner = c.mamba1_expand * m.d_model;
  if (m.mamba1.dt_rank == 0) m.mamba1.dt_rank = (m.d_model + 15) / 16;
  if (m.mamba2.heads == 0 && m.mamba2.head_dim > 0) {
    BRAID_REQUIRE((c.mamba2_expand * m.d_model) % m.mamba2.head_dim == 0, path,
                  ": mamba2.expand * model.d_model = ", c.mamba2_expand * m.d_model,
                  " must be a multiple of mamba2.head_dim = ", m.mamba2.head_dim,
                  " (or set mamba2.heads)");
    m.mamba2.heads = c.mamba2_expand * m.d_model / m.mamba2.head_dim;
  }
  if (m.attention.kv_heads == 0) m.attention.kv_heads = m.attention.heads;
  if (m.attention.head_dim == 0 && m.attention.heads > 0) {
    BRAID_REQUIRE(m.d_model % m.attention.heads == 0, path, ": model.d_model = ", m.d_model,
                  " must be a multiple of attention.heads = ", m.attention.heads,
                  " (or set attention.head_dim)");
    m.attention.head_dim = m.d_model / m.attention.heads;
  }
  c.lr.total = c.train.steps;
  try {
    validate_model_config(m);
    c.lr.validate();
    // The layout's model constraints hold for any rank count; the product is checked at launch.
    Layout probe = c.parallel;
    if (probe.dp == 0) probe.dp = 1;
    validate_layout_for_model(m, probe);
  } catch (const Error& e) {
    BRAID_REJECT(path, ": ", e.what());
  }
  BRAID_REQUIRE(
      c.train.recompute == "none" || c.train.recompute == "ssm" || c.train.recompute == "full",
      path, ": train.recompute = '", c.train.recompute,
      "' must be none, ssm (the Mamba mixers) or full");
  BRAID_REQUIRE(c.train.device == "cpu" || c.train.device == "cuda", path, ": train.device = '",
                c.train.device, "' must be cpu or cuda");
  if (c.train.precision.empty()) c.train.precision = c.train.device == "cuda" ? "bf16" : "fp32";
  BRAID_REQUIRE(c.train.precision == "bf16" || c.train.precision == "fp32", path,
                ": train.precision = '", c.train.precision, "' must be bf16 or fp32");
  BRAID_REQUIRE(c.train.device == "cuda" || c.train.precision == "fp32", path,
                ": train.precision = bf16 needs train.device = cuda (the CPU runs in fp32)");
  BRAID_REQUIRE(std::isfinite(c.parallel.grad_bucket_mb) && c.parallel.grad_bucket_mb >= 0, path,
                ": parallel.grad_bucket_mb = ", c.parallel.grad_bucket_mb,
                " must be 0 (reduce after the backward) or a positive size in MB");
  BRAID_REQUIRE(!c.data.train.empty(), path,
                ": data.train is empty: give the training shard file(s)");
  BRAID_REQUIRE(!c.data.valid.empty(), path,
                ": data.valid is empty: give the held-out shard file(s)");
  return c;
}

Layout resolve_layout(const RunConfig& cfg, int world_size) {
  Layout l = cfg.parallel;
  const int fixed = l.tp * l.cp * l.pp;
  if (l.dp == 0) {
    BRAID_REQUIRE(world_size % fixed == 0, "parallel: tp*cp*pp = ", fixed, " does not divide the ",
                  world_size,
                  " ranks, so dp cannot be derived (set parallel.tp/cp/pp so their product divides "
                  "the ranks)");
    l.dp = world_size / fixed;
  }
  RankGrid grid(l, world_size);  // checks the product and the order
  validate_layout_for_model(cfg.model, l);
  return l;
}

std::map<std::string, std::string> config_entries(const RunConfig& c) {
  std::map<std::string, std::string> out;
  for (const auto& [key, k] : registry()) out[key] = k.get(c);
  return out;
}

std::string config_to_yaml(const RunConfig& c) {
  std::string out, section;
  for (const auto& [key, k] : registry()) {
    const std::string s = key.substr(0, key.find('.'));
    if (s != section) out += s + ":\n", section = s;
    out += "  " + key.substr(key.find('.') + 1) + ": " + k.get(c) + "\n";
  }
  return out;
}

}  // namespace braid
