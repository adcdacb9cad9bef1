// Token shards: one file of packed documents, read by mmap.
//   header (64 bytes, little-endian): magic "BRAIDTOK", u32 version = 1, u32 token_bytes (2 or 4),
//   u32 vocab_size, u32 eos_id, u64 n_tokens, u64 n_docs, 24 bytes zero
//   tokens:    n_tokens x token_bytes
//   doc index: (n_docs + 1) x u64 token offsets, starting at 0 and ending at n_tokens
// Every document ends with the EOS token. Opening a shard checks the magic, version, exact file
// size (truncation), the document index and every token id against the vocabulary; errors name
// the file and the byte offset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace braid {

struct ShardHeader {
  uint32_t version = 1;
  uint32_t token_bytes = 2;
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
  uint64_t n_tokens = 0;
  uint64_t n_docs = 0;
};

// Writes documents (each already ending with EOS) to `path` atomically (temp file + rename).
void write_shard(const std::string& path, uint32_t vocab_size, uint32_t eos_id,
                 const std::vector<std::vector<uint32_t>>& docs);

class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  TokenShard(TokenShard&& o) noexcept;
  TokenShard& operator=(TokenShard&&) = delete;
  TokenShard(const TokenShard&) = delete;
  ~TokenShard();

  const ShardHeader& header() const { return h_; }
  const std::string& path() const { return path_; }
  uint64_t size() const { return h_.n_tokens; }
  uint32_t token(uint64_t i) const;
  uint64_t doc_offset(uint64_t d) const;

 private:
  std::string path_;
  ShardHeader h_;
  const unsigned char* map_ = nullptr;
  size_t map_size_ = 0;
};

}  // namespace braid
