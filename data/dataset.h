// A dataset of token shards read as one stream, cut into samples of T+1 tokens (stride T).
// The sampler is indexed by the global sample number g: epoch e = g / n and within the epoch the
// order is a Fisher-Yates permutation drawn from Philox(seed, e) — so the order does not depend on
// how many data-parallel ranks read it, and resuming at sample g is exact. Each sample gives
//   tokens[t] = s[t], targets[t] = s[t+1]            (t < T)
//   seq_idx[t]: document index inside the row, +1 after every EOS in tokens
//   positions[t]: t minus the start of its document
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/token_shard.h"
#include "runtime/tensor.h"

namespace braid {

class Dataset {
 public:
  Dataset(const std::vector<std::string>& shard_paths, int64_t seq_len);

  int64_t num_samples() const { return n_samples_; }
  int64_t num_tokens() const { return total_; }
  uint32_t vocab_size() const { return vocab_; }
  uint32_t eos_id() const { return eos_; }
  // Unigram entropy (nats per token) of all tokens in the dataset.
  double unigram_entropy() const;

  // Fills row `row` of the batch tensors ([B,T] i32) with sample `index` of the unshuffled order.
  void fill_row(int64_t index, int64_t row, const Tensor& tokens, const Tensor& targets,
                const Tensor& seq_idx, const Tensor& positions) const;

 private:
  uint32_t token_at(int64_t global) const;

  std::vector<TokenShard> shards_;
  std::vector<int64_t> starts_;  // global offset of each shard
  int64_t total_ = 0, seq_ = 0, n_samples_ = 0;
  uint32_t vocab_ = 0, eos_ = 0;
};

class Sampler {
 public:
  Sampler(const Dataset& data, uint64_t seed, bool shuffle);
  // The dataset sample index for global sample number g.
  int64_t sample(int64_t g);

 private:
  const Dataset& data_;
  uint64_t seed_;
  bool shuffle_;
  int64_t epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace braid
