#include "data/tokenizer.h"

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/check.h"

namespace braid {
namespace {

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

// Splits a UTF-8 string into its code points (as strings); invalid bytes stand alone.
std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool is_letter(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
}
bool is_digit(unsigned char c) {
  return c >= '0' && c <= '9';
}
bool is_space(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

void ByteTokenizer::encode(const std::string& text, std::vector<uint32_t>& out) const {
  for (unsigned char c : text) out.push_back(c);
}

std::string ByteTokenizer::decode(const std::vector<uint32_t>& ids) const {
  std::string s;
  for (uint32_t id : ids) s += id < 256 ? std::string(1, char(id)) : std::string("<|eos|>");
  return s;
}

std::vector<std::string> gpt2_pretokenize(const std::string& text) {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  std::vector<std::string> out;
  const size_t n = text.size();
  auto u = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  size_t i = 0;
  while (i < n) {
    if (text[i] == '\'') {
      bool matched = false;
      for (const char* c : {"s", "t", "re", "ve", "m", "ll", "d"}) {
        const size_t len = std::strlen(c);
        if (text.compare(i + 1, len, c) == 0) {
          out.push_back(text.substr(i, len + 1));
          i += len + 1;
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    const size_t start = i;
    const size_t j = (text[i] == ' ' && i + 1 < n && !is_space(u(i + 1))) ? i + 1 : i;
    if (is_letter(u(j))) {
      i = j;
      while (i < n && is_letter(u(i))) ++i;
    } else if (is_digit(u(j))) {
      i = j;
      while (i < n && is_digit(u(i))) ++i;
    } else if (!is_space(u(j))) {
      i = j;
      while (i < n && !is_space(u(i)) && !is_letter(u(i)) && !is_digit(u(i))) ++i;
    } else {
      while (i < n && is_space(u(i))) ++i;
      // \s+(?!\S): leave the last whitespace to prefix the next token when one follows.
      if (i < n && i - start > 1) --i;
    }
    out.push_back(text.substr(start, i - start));
  }
  return out;
}

BpeTokenizer::BpeTokenizer(const std::string& path, const std::string& eos_token) {
  std::ifstream f(path);
  BRAID_REQUIRE(f, "tokenizer '", path, "': cannot open");
  nlohmann::json j;
  try {
    f >> j;
  } catch (const std::exception& e) {
    BRAID_REJECT("tokenizer '", path, "': not valid JSON: ", e.what());
  }
  const auto& model = j["model"];
  BRAID_REQUIRE(model.is_object() && model.value("type", "") == "BPE", "tokenizer '", path,
                "': model.type must be BPE (Braid reads byte-level BPE tokenizer.json files)");
  const std::string pre = j["pre_tokenizer"].dump();
  BRAID_REQUIRE(pre.find("ByteLevel") != std::string::npos, "tokenizer '", path,
                "': pre_tokenizer is not ByteLevel; only byte-level BPE is supported");
  for (const auto& [tok, id] : model["vocab"].items()) {
    vocab_[tok] = id.get<uint32_t>();
    vocab_size_ = std::max(vocab_size_, id.get<uint32_t>() + 1);
  }
  if (j.contains("added_tokens"))
    for (const auto& a : j["added_tokens"]) {
      const uint32_t id = a["id"].get<uint32_t>();
      vocab_[a["content"].get<std::string>()] = id;
      vocab_size_ = std::max(vocab_size_, id + 1);
    }
  id_to_token_.resize(vocab_size_);
  for (const auto& [tok, id] : vocab_) id_to_token_[id] = tok;
  int rank = 0;
  for (const auto& m : model["merges"]) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      BRAID_REQUIRE(sp != std::string::npos, "tokenizer '", path, "': merge '", s,
                    "' has no space");
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else {
      a = m[0].get<std::string>(), b = m[1].get<std::string>();
    }
    merge_rank_[{a, b}] = rank++;
  }
  // GPT-2 bytes_to_unicode.
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_to_unicode_[b] = utf8(printable ? uint32_t(b) : uint32_t(256 + extra++));
    unicode_to_byte_[byte_to_unicode_[b]] = static_cast<unsigned char>(b);
  }
  const std::vector<std::string> eos_candidates =
      eos_token.empty() ? std::vector<std::string>{"<|endoftext|>", "</s>", "<|end_of_text|>"}
                        : std::vector<std::string>{eos_token};
  bool found = false;
  for (const auto& c : eos_candidates)
    if (auto it = vocab_.find(c); it != vocab_.end()) {
      eos_ = it->second, found = true;
      break;
    }
  BRAID_REQUIRE(
      found, "tokenizer '", path, "': end-of-text token '",
      eos_token.empty() ? std::string("<|endoftext|>, </s> or <|end_of_text|>") : eos_token,
      "' not in the vocabulary (set data.eos_token)");
}

void BpeTokenizer::encode_word(const std::string& word, std::vector<uint32_t>& out) const {
  std::vector<std::string> parts;
  for (unsigned char c : word) parts.push_back(byte_to_unicode_[c]);
  while (parts.size() > 1) {
    int best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = merge_rank_.find({parts[i], parts[i + 1]});
      if (it != merge_rank_.end() && (best < 0 || it->second < best)) best = it->second, at = i;
    }
    if (best < 0) break;
    parts[at] += parts[at + 1];
    parts.erase(parts.begin() + at + 1);
  }
  for (const auto& p : parts) {
    auto it = vocab_.find(p);
    BRAID_REQUIRE(it != vocab_.end(), "tokenizer: piece '", p, "' of word '", word,
                  "' is not in the vocabulary");
    out.push_back(it->second);
  }
}

void BpeTokenizer::encode(const std::string& text, std::vector<uint32_t>& out) const {
  for (const std::string& w : gpt2_pretokenize(text)) encode_word(w, out);
}

std::string BpeTokenizer::decode(const std::vector<uint32_t>& ids) const {
  std::string s;
  for (uint32_t id : ids) {
    BRAID_REQUIRE(id < id_to_token_.size(), "tokenizer: id ", id, " outside the vocabulary");
    for (const std::string& ch : utf8_chars(id_to_token_[id])) {
      auto it = unicode_to_byte_.find(ch);
      s += it != unicode_to_byte_.end() ? std::string(1, char(it->second)) : ch;
    }
  }
  return s;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec, const std::string& eos_token) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  return std::make_unique<BpeTokenizer>(spec, eos_token);
}

}  // namespace braid
