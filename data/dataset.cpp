#include "data/dataset.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/check.h"
#include "runtime/philox.h"

namespace braid {

Dataset::Dataset(const std::vector<std::string>& paths, int64_t seq_len) : seq_(seq_len) {
  BRAID_REQUIRE(!paths.empty(), "dataset: no shard files given");
  BRAID_REQUIRE(seq_len > 0, "dataset: sequence length ", seq_len, " must be positive");
  for (const std::string& p : paths) {
    shards_.emplace_back(p);
    const ShardHeader& h = shards_.back().header();
    if (shards_.size() == 1) {
      vocab_ = h.vocab_size, eos_ = h.eos_id;
    } else {
      BRAID_REQUIRE(h.vocab_size == vocab_ && h.eos_id == eos_, "dataset: shard '", p,
                    "' has vocab ", h.vocab_size, " / eos ", h.eos_id, " but '", paths[0], "' has ",
                    vocab_, " / ", eos_);
    }
    starts_.push_back(total_);
    total_ += static_cast<int64_t>(h.n_tokens);
  }
  n_samples_ = total_ > 1 ? (total_ - 1) / seq_len : 0;
  BRAID_REQUIRE(n_samples_ > 0, "dataset: ", total_, " tokens in ", paths.size(),
                " shard(s) (first '", paths[0], "') are too few for one sample of ", seq_len + 1,
                " tokens");
}

uint32_t Dataset::token_at(int64_t g) const {
  size_t s =
      static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), g) - starts_.begin()) -
      1;
  return shards_[s].token(static_cast<uint64_t>(g - starts_[s]));
}

void Dataset::fill_row(int64_t index, int64_t row, const Tensor& tokens, const Tensor& targets,
                       const Tensor& seq_idx, const Tensor& positions) const {
  BRAID_REQUIRE(index >= 0 && index < n_samples_, "dataset: sample ", index, " outside [0, ",
                n_samples_, ")");
  const int64_t t = seq_, base = index * seq_;
  int32_t *tk = tokens.ptr<int32_t>() + row * t, *tg = targets.ptr<int32_t>() + row * t;
  int32_t *sq = seq_idx.ptr<int32_t>() + row * t, *ps = positions.ptr<int32_t>() + row * t;
  int32_t doc = 0, start = 0;
  for (int64_t i = 0; i < t; ++i) {
    if (i > 0 && static_cast<uint32_t>(tk[i - 1]) == eos_) ++doc, start = int32_t(i);
    tk[i] = static_cast<int32_t>(token_at(base + i));
    tg[i] = static_cast<int32_t>(token_at(base + i + 1));
    sq[i] = doc;
    ps[i] = int32_t(i) - start;
  }
}

double Dataset::unigram_entropy() const {
  std::vector<int64_t> count(vocab_, 0);
  for (const TokenShard& s : shards_)
    for (uint64_t i = 0; i < s.size(); ++i) ++count[s.token(i)];
  double h = 0;
  for (int64_t c : count)
    if (c > 0) {
      const double p = double(c) / double(total_);
      h -= p * std::log(p);
    }
  return h;
}

Sampler::Sampler(const Dataset& data, uint64_t seed, bool shuffle)
    : data_(data), seed_(seed), shuffle_(shuffle) {}

int64_t Sampler::sample(int64_t g) {
  BRAID_REQUIRE(g >= 0, "sampler: negative sample number ", g);
  const int64_t n = data_.num_samples(), e = g / n;
  if (!shuffle_) return g % n;
  if (e != epoch_) {
    perm_.resize(static_cast<size_t>(n));
    std::iota(perm_.begin(), perm_.end(), int64_t(0));
    for (int64_t i = n - 1; i > 0; --i) {
      const uint32_t r =
          philox::bits(seed_, static_cast<uint32_t>(e), static_cast<uint64_t>(i)).v[0];
      std::swap(perm_[i], perm_[r % static_cast<uint64_t>(i + 1)]);
    }
    epoch_ = e;
  }
  return perm_[g % n];
}

}  // namespace braid
