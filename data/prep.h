// `braid prep`: turns text files into train and held-out token shards.
// Each input file is one document (followed by EOS). Directories are searched recursively for
// files whose name ends with one of `extensions` (all files when empty), in sorted path order.
// A document goes to the held-out shard when a hash of its path (relative to its input
// directory, or its file name) falls below valid_fraction, wherever the corpus lives.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace braid {

struct PrepOptions {
  std::vector<std::string> inputs;      // files or directories
  std::vector<std::string> extensions;  // e.g. {".py"}; empty = every file
  std::string tokenizer = "byte";       // "byte" or a tokenizer.json path
  std::string eos_token;                // for tokenizer.json
  std::string out_dir;
  double valid_fraction = 0.05;
};

struct PrepReport {
  int64_t train_docs = 0, valid_docs = 0, train_tokens = 0, valid_tokens = 0;
  std::string train_path, valid_path;
};

PrepReport prep_corpus(const PrepOptions& opt);

}  // namespace braid
