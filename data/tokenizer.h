// Tokenizers turning text into token ids.
//   ByteTokenizer: ids 0..255 are the bytes, 256 is EOS (vocabulary 257).
//   BpeTokenizer:  a Hugging Face tokenizer.json with a byte-level BPE model (GPT-2, Llama-3,
//                  Qwen, ... style): GPT-2's byte-to-unicode map, GPT-2 pre-tokenisation
//                  (contractions, letter runs, digit runs, punctuation runs, whitespace), then
//                  merges by rank. Bytes >= 0x80 count as letters in pre-tokenisation (exact
//                  for ASCII text; an approximation of Unicode letter classes otherwise).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace braid {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual void encode(const std::string& text, std::vector<uint32_t>& out) const = 0;
  virtual std::string decode(const std::vector<uint32_t>& ids) const = 0;
  virtual uint32_t vocab_size() const = 0;
  virtual uint32_t eos_id() const = 0;
};

class ByteTokenizer final : public Tokenizer {
 public:
  void encode(const std::string& text, std::vector<uint32_t>& out) const override;
  std::string decode(const std::vector<uint32_t>& ids) const override;
  uint32_t vocab_size() const override { return 257; }
  uint32_t eos_id() const override { return 256; }
};

class BpeTokenizer final : public Tokenizer {
 public:
  // eos_token: the added token used as EOS ("" picks <|endoftext|>, </s> or <|end_of_text|>).
  BpeTokenizer(const std::string& tokenizer_json_path, const std::string& eos_token);
  void encode(const std::string& text, std::vector<uint32_t>& out) const override;
  std::string decode(const std::vector<uint32_t>& ids) const override;
  uint32_t vocab_size() const override { return vocab_size_; }
  uint32_t eos_id() const override { return eos_; }

 private:
  void encode_word(const std::string& word, std::vector<uint32_t>& out) const;

  std::unordered_map<std::string, uint32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::map<std::pair<std::string, std::string>, int> merge_rank_;
  std::string byte_to_unicode_[256];
  std::unordered_map<std::string, unsigned char> unicode_to_byte_;
  uint32_t vocab_size_ = 0, eos_ = 0;
};

// "byte" or a path to tokenizer.json.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec, const std::string& eos_token);

// Splits text into GPT-2 pre-tokens (exposed for tests).
std::vector<std::string> gpt2_pretokenize(const std::string& text);

}  // namespace braid
