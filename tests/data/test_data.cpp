// Data: shard round trip and every rejection (magic, truncation, token >= vocab, document index),
// dataset rows with document indices and positions, sampler order, tokenizers, prep.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>

#include "data/dataset.h"
#include "data/prep.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"
#include "runtime/check.h"
#include "tests/test_util.h"

namespace braid {
namespace {
namespace fs = std::filesystem;

using test::TempDir;

using test::error_of;

std::vector<char> read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void write_all(const std::string& p, const std::vector<char>& d) {
  std::ofstream f(p, std::ios::binary);
  f.write(d.data(), std::streamsize(d.size()));
}

TEST(TokenShard, RoundTrip) {
  TempDir dir;
  const std::string p = dir.file("a.tok");
  write_shard(p, 300, 299, {{1, 2, 299}, {5, 299}, {298, 7, 8, 299}});
  TokenShard s(p);
  EXPECT_EQ(s.size(), 9u);
  EXPECT_EQ(s.header().n_docs, 3u);
  EXPECT_EQ(s.header().token_bytes, 2u);
  EXPECT_EQ(s.token(5), 298u);
  EXPECT_EQ(s.doc_offset(2), 5u);
  write_shard(dir.file("wide.tok"), 70000, 69999, {{69998, 69999}});
  TokenShard w(dir.file("wide.tok"));
  EXPECT_EQ(w.header().token_bytes, 4u);
  EXPECT_EQ(w.token(0), 69998u);
}

TEST(TokenShard, RejectsBadFilesNamingFileAndOffset) {
  TempDir dir;
  const std::string p = dir.file("a.tok");
  write_shard(p, 300, 299, {{1, 2, 299}, {5, 299}});
  const std::vector<char> good = read_all(p);

  std::vector<char> d = good;
  d[0] = 'X';
  write_all(p, d);
  std::string e = error_of([&] { TokenShard s(p); });
  EXPECT_NE(e.find("bad magic at offset 0"), std::string::npos) << e;
  EXPECT_NE(e.find(p), std::string::npos) << e;

  d = good;
  d.resize(d.size() - 5);
  write_all(p, d);
  e = error_of([&] { TokenShard s(p); });
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;

  d = good;
  d.resize(30);
  write_all(p, d);
  e = error_of([&] { TokenShard s(p); });
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;

  d = good;
  const uint16_t big = 300;  // token 1 (byte offset 66) := vocab
  std::memcpy(d.data() + 66, &big, 2);
  write_all(p, d);
  e = error_of([&] { TokenShard s(p); });
  EXPECT_NE(e.find("token id 300 at byte offset 66"), std::string::npos) << e;

  d = good;
  const uint64_t off = 1;  // second index entry (byte 64 + 10 + 8) out of order
  std::memcpy(d.data() + 64 + 10 + 8, &off, 8);
  std::memcpy(d.data() + 64 + 10 + 16, &off, 8);
  write_all(p, d);
  e = error_of([&] { TokenShard s(p); });
  EXPECT_NE(e.find("document index"), std::string::npos) << e;

  e = error_of([&] { TokenShard s(dir.file("missing.tok")); });
  EXPECT_NE(e.find("cannot open"), std::string::npos) << e;
}

TEST(Dataset, RowsCarryDocumentsAndPositions) {
  TempDir dir;
  const std::string p = dir.file("d.tok");
  // Stream: 10 11 E 12 E 13 14 15 E  (E = 9)
  write_shard(p, 16, 9, {{10, 11, 9}, {12, 9}, {13, 14, 15, 9}});
  Dataset ds({p}, 4);
  EXPECT_EQ(ds.num_samples(), 2);  // (9 - 1) / 4
  std::vector<int32_t> tk(4), tg(4), sq(4), ps(4);
  auto t = [](std::vector<int32_t>& v) {
    return Tensor::contiguous_view(v.data(), DType::i32, Device::cpu, {1, 4}, "t");
  };
  ds.fill_row(0, 0, t(tk), t(tg), t(sq), t(ps));
  EXPECT_EQ(tk, (std::vector<int32_t>{10, 11, 9, 12}));
  EXPECT_EQ(tg, (std::vector<int32_t>{11, 9, 12, 9}));
  EXPECT_EQ(sq, (std::vector<int32_t>{0, 0, 0, 1}));
  EXPECT_EQ(ps, (std::vector<int32_t>{0, 1, 2, 0}));
  ds.fill_row(1, 0, t(tk), t(tg), t(sq), t(ps));
  EXPECT_EQ(tk, (std::vector<int32_t>{9, 13, 14, 15}));
  EXPECT_EQ(sq, (std::vector<int32_t>{0, 1, 1, 1}));
  EXPECT_EQ(ps, (std::vector<int32_t>{0, 0, 1, 2}));
  // Unigram entropy of {10,11,12,13,14,15 once, 9 three times} over 9 tokens.
  const double h = -(6 * (1.0 / 9) * std::log(1.0 / 9) + (3.0 / 9) * std::log(3.0 / 9));
  EXPECT_NEAR(ds.unigram_entropy(), h, 1e-12);
  EXPECT_NE(error_of([&] { Dataset small({p}, 100); }).find("too few"), std::string::npos);
}

TEST(Sampler, EachEpochIsAPermutationAndOrderIsReproducible) {
  TempDir dir;
  std::vector<uint32_t> doc(1001, 1);
  doc.back() = 0;
  write_shard(dir.file("s.tok"), 2, 0, {doc});
  Dataset ds({dir.file("s.tok")}, 10);
  ASSERT_EQ(ds.num_samples(), 100);
  Sampler a(ds, 7, true), b(ds, 7, true), c(ds, 8, true);
  std::set<int64_t> epoch0, epoch1;
  int same_as_other_seed = 0, same_across_epochs = 0;
  for (int64_t g = 0; g < 100; ++g) {
    const int64_t s = a.sample(g);
    epoch0.insert(s);
    same_as_other_seed += c.sample(g) == s;
  }
  for (int64_t g = 100; g < 200; ++g) {
    const int64_t s = a.sample(g);
    epoch1.insert(s);
    same_across_epochs += a.sample(g - 100) == s;
  }
  EXPECT_EQ(epoch0.size(), 100u);
  EXPECT_EQ(epoch1.size(), 100u);
  EXPECT_LT(same_as_other_seed, 10);
  EXPECT_LT(same_across_epochs, 10);
  // Random access (as a resumed run or another DP rank would) gives the same sample.
  EXPECT_EQ(b.sample(137), a.sample(137));
  EXPECT_EQ(b.sample(3), a.sample(3));
  Sampler seq(ds, 7, false);
  EXPECT_EQ(seq.sample(105), 5);
}

TEST(Tokenizer, BytesRoundTrip) {
  ByteTokenizer t;
  std::vector<uint32_t> ids;
  t.encode("hi\xff", ids);
  EXPECT_EQ(ids, (std::vector<uint32_t>{'h', 'i', 255}));
  EXPECT_EQ(t.decode(ids), "hi\xff");
  EXPECT_EQ(t.eos_id(), 256u);
}

TEST(Tokenizer, Gpt2PreTokenization) {
  using V = std::vector<std::string>;
  EXPECT_EQ(gpt2_pretokenize("Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(gpt2_pretokenize("don't  stop\n\nx = 42;"),
            (V{"don", "'t", " ", " stop", "\n", "\n", "x", " =", " 42", ";"}));
  EXPECT_EQ(gpt2_pretokenize("a  "), (V{"a", "  "}));
  EXPECT_EQ(gpt2_pretokenize("  .x"), (V{" ", " .", "x"}));
}

TEST(Tokenizer, BpeFromTokenizerJson) {
  TempDir dir;
  const std::string p = dir.file("tokenizer.json");
  // Byte-level alphabet for the letters used, plus merges: "l o" -> "lo", "lo w" -> "low",
  // "Ġ l" -> "Ġl" (Ġ is the byte-level symbol of a space).
  std::ofstream(p) << R"({
    "model": {"type": "BPE",
      "vocab": {"l": 0, "o": 1, "w": 2, "Ġ": 3, "lo": 4, "low": 5, "Ġl": 6, "e": 7, "!": 8},
      "merges": ["l o", ["lo", "w"], "Ġ l"]},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
    "added_tokens": [{"id": 9, "content": "<|endoftext|>", "special": true}]
  })";
  BpeTokenizer t(p, "");
  EXPECT_EQ(t.vocab_size(), 10u);
  EXPECT_EQ(t.eos_id(), 9u);
  std::vector<uint32_t> ids;
  t.encode("low lowe!", ids);
  // "low" -> l o w -> lo w -> low. " lowe" -> Ġ l o w e: "l o" (rank 0) beats "Ġ l" (rank 2),
  // giving Ġ lo w e, then "lo w" (rank 1): Ġ low e, and no merge applies to (Ġ, low).
  EXPECT_EQ(ids, (std::vector<uint32_t>{5, 3, 5, 7, 8}));
  EXPECT_EQ(t.decode(ids), "low lowe!");
  EXPECT_NE(error_of([&] { BpeTokenizer bad(p, "</s>"); }).find("'</s>' not in the vocabulary"),
            std::string::npos);
  std::ofstream(dir.file("wp.json"))
      << R"({"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": null})";
  EXPECT_NE(
      error_of([&] { BpeTokenizer bad(dir.file("wp.json"), ""); }).find("model.type must be BPE"),
      std::string::npos);
}

TEST(Prep, SplitsDocumentsIntoTrainAndHeldOut) {
  TempDir dir;
  fs::create_directories(dir.file("src/sub"));
  for (int i = 0; i < 40; ++i)
    std::ofstream(
        dir.file("src/" + std::string(i % 2 ? "sub/" : "") + "f" + std::to_string(i) + ".py"))
        << "def f" << i << "():\n    return " << i << "\n";
  std::ofstream(dir.file("src/notes.txt")) << "ignored";
  PrepOptions opt;
  opt.inputs = {dir.file("src")};
  opt.extensions = {".py"};
  opt.out_dir = dir.file("out");
  opt.valid_fraction = 0.2;
  const PrepReport r = prep_corpus(opt);
  EXPECT_EQ(r.train_docs + r.valid_docs, 40);
  EXPECT_GT(r.valid_docs, 0);
  EXPECT_GT(r.train_docs, r.valid_docs);
  TokenShard t(r.train_path), v(r.valid_path);
  EXPECT_EQ(int64_t(t.header().n_docs), r.train_docs);
  EXPECT_EQ(t.token(t.size() - 1), 256u);  // every document ends with EOS
  // Deterministic: the same inputs give the same split.
  EXPECT_EQ(prep_corpus(opt).valid_docs, r.valid_docs);
  opt.inputs = {dir.file("nothing_here")};
  EXPECT_NE(error_of([&] { prep_corpus(opt); }).find("does not exist"), std::string::npos);
}

}  // namespace
}  // namespace braid
