#include "data/prep.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/token_shard.h"
#include "data/tokenizer.h"
#include "runtime/check.h"

namespace braid {
namespace fs = std::filesystem;

namespace {

bool wanted(const fs::path& p, const std::vector<std::string>& ext) {
  if (ext.empty()) return true;
  const std::string name = p.filename().string();
  for (const auto& e : ext)
    if (name.size() >= e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0)
      return true;
  return false;
}

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

PrepReport prep_corpus(const PrepOptions& opt) {
  BRAID_REQUIRE(!opt.inputs.empty(), "prep: no inputs given (--input PATH)");
  BRAID_REQUIRE(!opt.out_dir.empty(), "prep: no output directory given (--out DIR)");
  BRAID_REQUIRE(opt.valid_fraction > 0 && opt.valid_fraction < 1, "prep: valid fraction ",
                opt.valid_fraction, " must be in (0, 1)");
  // (path, name used for the split): the path relative to its input directory, or the file name,
  // so the split does not depend on where the corpus lives.
  std::vector<std::pair<fs::path, std::string>> files;
  for (const std::string& in : opt.inputs) {
    const fs::path p(in);
    BRAID_REQUIRE(fs::exists(p), "prep: input '", in, "' does not exist");
    if (fs::is_directory(p)) {
      for (const auto& e :
           fs::recursive_directory_iterator(p, fs::directory_options::skip_permission_denied))
        if (e.is_regular_file() && wanted(e.path(), opt.extensions))
          files.emplace_back(e.path(), fs::relative(e.path(), p).string());
    } else {
      files.emplace_back(p, p.filename().string());
    }
  }
  std::sort(files.begin(), files.end());
  BRAID_REQUIRE(!files.empty(), "prep: no input files matched");
  const auto tok = make_tokenizer(opt.tokenizer, opt.eos_token);
  std::vector<std::vector<uint32_t>> train, valid;
  PrepReport r;
  for (const auto& [f, split_name] : files) {
    std::ifstream in(f, std::ios::binary);
    BRAID_REQUIRE(in, "prep: cannot read '", f.string(), "'");
    std::stringstream ss;
    ss << in.rdbuf();
    std::vector<uint32_t> ids;
    tok->encode(ss.str(), ids);
    if (ids.empty()) continue;
    ids.push_back(tok->eos_id());
    const bool is_valid = double(fnv1a64(split_name) % 1000000) < opt.valid_fraction * 1e6;
    (is_valid ? r.valid_tokens : r.train_tokens) += static_cast<int64_t>(ids.size());
    (is_valid ? r.valid_docs : r.train_docs) += 1;
    (is_valid ? valid : train).push_back(std::move(ids));
  }
  BRAID_REQUIRE(
      !train.empty() && !valid.empty(), "prep: ", files.size(), " file(s) gave ", train.size(),
      " train and ", valid.size(),
      " held-out documents; both must be non-empty (more files or another valid fraction)");
  fs::create_directories(opt.out_dir);
  r.train_path = (fs::path(opt.out_dir) / "train.tok").string();
  r.valid_path = (fs::path(opt.out_dir) / "valid.tok").string();
  write_shard(r.train_path, tok->vocab_size(), tok->eos_id(), train);
  write_shard(r.valid_path, tok->vocab_size(), tok->eos_id(), valid);
  return r;
}

}  // namespace braid
