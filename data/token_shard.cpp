#include "data/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <utility>

#include "runtime/check.h"

namespace braid {
namespace {

constexpr char kMagic[8] = {'B', 'R', 'A', 'I', 'D', 'T', 'O', 'K'};
constexpr size_t kHeaderBytes = 64;

template <typename T>
T read_le(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

void write_shard(const std::string& path, uint32_t vocab_size, uint32_t eos_id,
                 const std::vector<std::vector<uint32_t>>& docs) {
  ShardHeader h;
  h.vocab_size = vocab_size;
  h.eos_id = eos_id;
  h.token_bytes = vocab_size <= 65536 ? 2 : 4;
  h.n_docs = docs.size();
  for (const auto& d : docs) h.n_tokens += d.size();
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  BRAID_REQUIRE(f, "cannot write '", tmp, "': ", std::strerror(errno));
  unsigned char header[kHeaderBytes] = {};
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &h.version, 4);
  std::memcpy(header + 12, &h.token_bytes, 4);
  std::memcpy(header + 16, &h.vocab_size, 4);
  std::memcpy(header + 20, &h.eos_id, 4);
  std::memcpy(header + 24, &h.n_tokens, 8);
  std::memcpy(header + 32, &h.n_docs, 8);
  bool ok = std::fwrite(header, 1, kHeaderBytes, f) == kHeaderBytes;
  std::vector<unsigned char> buf;
  for (const auto& d : docs) {
    for (uint32_t t : d) {
      BRAID_REQUIRE(t < vocab_size, "write_shard: token ", t, " >= vocab ", vocab_size);
      buf.insert(buf.end(), reinterpret_cast<unsigned char*>(&t),
                 reinterpret_cast<unsigned char*>(&t) + h.token_bytes);
    }
  }
  ok = ok && std::fwrite(buf.data(), 1, buf.size(), f) == buf.size();
  uint64_t off = 0;
  ok = ok && std::fwrite(&off, 8, 1, f) == 1;
  for (const auto& d : docs) {
    off += d.size();
    ok = ok && std::fwrite(&off, 8, 1, f) == 1;
  }
  ok = (std::fclose(f) == 0) && ok;
  BRAID_REQUIRE(ok, "writing '", tmp, "' failed: ", std::strerror(errno));
  BRAID_REQUIRE(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename '", tmp, "' to '", path,
                "'");
}

TokenShard::TokenShard(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  BRAID_REQUIRE(fd >= 0, "token shard '", path, "': cannot open: ", std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ > 0) {
    void* m = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    BRAID_REQUIRE(m != MAP_FAILED, "token shard '", path, "': mmap failed: ", std::strerror(errno));
    map_ = static_cast<const unsigned char*>(m);
  } else {
    ::close(fd);
  }
  auto fail_if = [&](bool bad, auto&&... msg) {
    if (!bad) return;
    if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
    map_ = nullptr;
    BRAID_REJECT("token shard '", path, "': ", msg...);
  };
  fail_if(map_size_ < kHeaderBytes, "truncated: ", map_size_, " bytes, smaller than the ",
          kHeaderBytes, "-byte header");
  fail_if(std::memcmp(map_, kMagic, 8) != 0, "bad magic at offset 0 (not a Braid token shard)");
  h_.version = read_le<uint32_t>(map_ + 8);
  h_.token_bytes = read_le<uint32_t>(map_ + 12);
  h_.vocab_size = read_le<uint32_t>(map_ + 16);
  h_.eos_id = read_le<uint32_t>(map_ + 20);
  h_.n_tokens = read_le<uint64_t>(map_ + 24);
  h_.n_docs = read_le<uint64_t>(map_ + 32);
  fail_if(h_.version != 1, "unsupported version ", h_.version,
          " at offset 8 (this build reads version 1)");
  fail_if(h_.token_bytes != 2 && h_.token_bytes != 4, "token width ", h_.token_bytes,
          " at offset 12 is not 2 or 4");
  fail_if(h_.vocab_size == 0 || h_.eos_id >= h_.vocab_size, "eos id ", h_.eos_id,
          " outside vocabulary of ", h_.vocab_size);
  fail_if(h_.n_tokens > (uint64_t(1) << 48) || h_.n_docs > h_.n_tokens,
          "implausible counts in header: ", h_.n_tokens, " tokens, ", h_.n_docs, " documents");
  const uint64_t expect = kHeaderBytes + h_.n_tokens * h_.token_bytes + (h_.n_docs + 1) * 8;
  fail_if(map_size_ != expect, map_size_ < expect ? "truncated: " : "trailing bytes: ", "file has ",
          map_size_, " bytes, header describes ", expect);
  uint64_t prev = 0;
  for (uint64_t d = 0; d <= h_.n_docs; ++d) {
    const uint64_t off = doc_offset(d);
    const uint64_t at = kHeaderBytes + h_.n_tokens * h_.token_bytes + d * 8;
    fail_if(d == 0 && off != 0, "document index does not start at 0 (byte offset ", at, ")");
    fail_if(off < prev || off > h_.n_tokens, "document index entry ", d, " = ", off,
            " at byte offset ", at, " is out of order or past the end");
    prev = off;
  }
  fail_if(prev != h_.n_tokens, "document index ends at ", prev,
          ", not at n_tokens = ", h_.n_tokens);
  for (uint64_t i = 0; i < h_.n_tokens; ++i) {
    const uint32_t t = token(i);
    fail_if(t >= h_.vocab_size, "token id ", t, " at byte offset ",
            kHeaderBytes + i * h_.token_bytes, " (token ", i, ") is >= vocab_size ", h_.vocab_size);
  }
}

TokenShard::TokenShard(TokenShard&& o) noexcept
    : path_(std::move(o.path_)),
      h_(o.h_),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(o.map_size_) {}

TokenShard::~TokenShard() {
  if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
}

uint32_t TokenShard::token(uint64_t i) const {
  const unsigned char* p = map_ + kHeaderBytes + i * h_.token_bytes;
  return h_.token_bytes == 2 ? read_le<uint16_t>(p) : read_le<uint32_t>(p);
}

uint64_t TokenShard::doc_offset(uint64_t d) const {
  return read_le<uint64_t>(map_ + kHeaderBytes + h_.n_tokens * h_.token_bytes + d * 8);
}

}  // namespace braid
