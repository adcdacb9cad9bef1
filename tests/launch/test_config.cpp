// Config loading: defaults, derived sizes, overrides, and errors naming the key and location.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "launch/config.h"
#include "runtime/check.h"

namespace braid {
namespace {

class ConfigFile {
 public:
  explicit ConfigFile(const std::string& text) {
    path_ = (std::filesystem::temp_directory_path() /
             ("braid_cfg_" + std::to_string(::getpid()) + "_" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".yaml"))
                .string();
    std::ofstream(path_) << text;
  }
  ~ConfigFile() { std::filesystem::remove(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

const char* kBase =
    "model:\n"
    "  pattern: \"M*-E\"\n"
    "  d_model: 64\n"
    "  vocab_size: 300\n"
    "mamba2:\n"
    "  head_dim: 16\n"
    "attention:\n"
    "  heads: 4\n"
    "mlp:\n"
    "  ffn: 128\n"
    "moe:\n"
    "  ffn: 64\n"
    "train:\n"
    "  steps: 50\n"
    "data:\n"
    "  train: [a.tok, b.tok]\n"
    "  valid: c.tok\n";

std::string error_of(const std::string& path, const std::vector<std::string>& overrides = {}) {
  try {
    load_config(path, overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, LoadsDerivesAndOverrides) {
  ConfigFile f(kBase);
  const RunConfig c =
      load_config(f.path(), {"train.micro_batch=3", "optim.lr=2e-3", "data.valid=[x.tok, y.tok]"});
  EXPECT_EQ(c.model.mamba2.heads, 8);         // expand 2 * 64 / 16
  EXPECT_EQ(c.model.attention.head_dim, 16);  // 64 / 4
  EXPECT_EQ(c.model.attention.kv_heads, 4);   // defaults to heads
  EXPECT_EQ(c.model.mamba1.d_inner, 128);
  EXPECT_EQ(c.train.micro_batch, 3);
  EXPECT_DOUBLE_EQ(c.lr.peak, 2e-3);
  EXPECT_EQ(c.lr.total, 50);
  EXPECT_EQ(c.data.train, (std::vector<std::string>{"a.tok", "b.tok"}));
  EXPECT_EQ(c.data.valid, (std::vector<std::string>{"x.tok", "y.tok"}));
  // train.precision: bf16 on GPUs and fp32 on the CPU unless given.
  EXPECT_EQ(c.train.precision, "fp32");
  EXPECT_EQ(load_config(f.path(), {"train.device=cuda"}).train.precision, "bf16");
  EXPECT_EQ(load_config(f.path(), {"train.device=cuda", "train.precision=fp32"}).train.precision,
            "fp32");
}

TEST(Config, ResolvedYamlLoadsToTheSameConfig) {
  ConfigFile f(kBase);
  const RunConfig c = load_config(f.path(), {"moe.score=sigmoid", "moe.balance_bias=true"});
  ConfigFile again(config_to_yaml(c));
  EXPECT_EQ(config_to_yaml(load_config(again.path(), {})), config_to_yaml(c));
}

TEST(Config, UnknownKeyNamesKeyFileAndLine) {
  ConfigFile f(std::string(kBase) + "optim:\n  learning_rate: 0.1\n");
  const std::string e = error_of(f.path());
  EXPECT_NE(e.find(f.path() + ":19: unknown key 'optim.learning_rate'"), std::string::npos) << e;
  EXPECT_NE(e.find("optim.lr"), std::string::npos) << e;  // lists the known keys of the section
  EXPECT_NE(error_of(f.path(), {}).find("unknown key"), std::string::npos);
  ConfigFile g(kBase);
  const std::string o = error_of(g.path(), {"train.stepz=3"});
  EXPECT_NE(o.find("command line 'train.stepz=3': unknown key 'train.stepz'"), std::string::npos)
      << o;
}

TEST(Config, BadValuesNameTheKey) {
  ConfigFile f(kBase);
  EXPECT_NE(error_of(f.path(), {"model.d_model=abc"})
                .find("model.d_model: expected an integer, got 'abc'"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"train.steps=0"}).find("train.steps: must be at least 1"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"attention.kv_heads=3"})
                .find("attention.kv_heads = 3 must divide attention.heads = 4"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"moe.score=relu"}).find("expected softmax or sigmoid"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"model.tie_embeddings=yes"}).find("expected true or false"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"optim.warmup=80"}).find("optim.warmup = 80"), std::string::npos);
  EXPECT_NE(error_of(f.path(), {"model.pattern=M?"}).find("symbol '?'"), std::string::npos);
  EXPECT_NE(error_of(f.path(), {"novalue"}).find("is not key=value"), std::string::npos);
  EXPECT_NE(error_of(f.path(), {"train.precision=fp16"}).find("must be bf16 or fp32"),
            std::string::npos);
  EXPECT_NE(error_of(f.path(), {"train.precision=bf16"})
                .find("train.precision = bf16 needs train.device = cuda"),
            std::string::npos);
  EXPECT_NE(error_of("/nonexistent/braid.yaml").find("cannot open the config file"),
            std::string::npos);
  ConfigFile broken("model: [unclosed\n");
  EXPECT_NE(error_of(broken.path()).find("not valid YAML"), std::string::npos);
}

TEST(Config, ParallelLayoutResolvesAndNamesBrokenConstraints) {
  ConfigFile f(kBase);
  RunConfig c = load_config(f.path(), {"mamba2.groups=4", "moe.experts=8"});
  EXPECT_EQ(c.parallel.dp, 0);  // derived at launch
  EXPECT_EQ(resolve_layout(c, 8).dp, 8);
  c.parallel.tp = 2;
  c.model.pattern = "M*-M";  // without MoE layers (etp = tp is checked below)
  EXPECT_EQ(resolve_layout(c, 8).dp, 4);
  auto err = [&](RunConfig cc, int world) {
    try {
      resolve_layout(cc, world);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  RunConfig bad = c;
  bad.parallel.tp = 3;
  EXPECT_NE(err(bad, 3).find("is not divisible by parallel.tp = 3"), std::string::npos)
      << err(bad, 3);
  EXPECT_NE(err(bad, 3).find("tp values that divide every sharded size: 1, 2, 4"),
            std::string::npos)
      << err(bad, 3);
  bad = c;
  bad.model.pattern = "M*-E", bad.parallel.tp = 1, bad.parallel.ep = 3;
  EXPECT_NE(err(bad, 6).find("moe.experts = 8 is not divisible by parallel.ep = 3"),
            std::string::npos)
      << err(bad, 6);
  bad = c;
  bad.parallel.tp = 4;
  EXPECT_NE(err(bad, 6).find("does not divide the 6 ranks"), std::string::npos) << err(bad, 6);
  bad = c;
  bad.parallel.tp = 1, bad.parallel.pp = 9;
  EXPECT_NE(err(bad, 9).find("parallel.pp = 9 exceeds the 4 layers"), std::string::npos)
      << err(bad, 9);
  bad = c;
  bad.model.pattern = "M*E", bad.parallel.tp = 2;  // experts split over the tp ranks: etp = tp
  EXPECT_NE(err(bad, 2).find("parallel.etp = 1 with parallel.tp = 2"), std::string::npos)
      << err(bad, 2);
  bad.parallel.etp = 2;
  EXPECT_EQ(err(bad, 2), "");
  bad = c;
  bad.parallel.order = "tp-dp";
  EXPECT_NE(err(bad, 8).find("must name cp exactly once"), std::string::npos) << err(bad, 8);
  // A bad layout in the config file is caught when it is loaded (before anything is allocated).
  ConfigFile g(kBase);
  EXPECT_NE(error_of(g.path(), {"parallel.tp=3"}).find("parallel.tp = 3"), std::string::npos);
}

TEST(Config, EveryShippedConfigLoads) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(BRAID_SOURCE_DIR "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    SCOPED_TRACE(e.path().string());
    const RunConfig c = load_config(e.path().string(), {});
    EXPECT_FALSE(c.model.pattern.empty());
    ++n;
  }
  EXPECT_GE(n, 4);
}

}  // namespace
}  // namespace braid
