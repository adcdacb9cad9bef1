// Checked calls and errors. Every failure becomes a braid::Error whose message starts with
// "file:line:", so a wrong config, a bad shard or a failed library call reports where it failed.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace braid {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": ";
  (os << ... << args);
  throw Error(os.str());
}
}  // namespace detail

}  // namespace braid

// BRAID_CHECK(cond, "message parts", ...): throws braid::Error("file:line: message parts").
#define BRAID_CHECK(cond, ...)                                                        \
  do {                                                                                \
    if (!(cond)) ::braid::detail::fail(__FILE__, __LINE__, __VA_ARGS__);              \
  } while (0)
#define BRAID_FAIL(...) ::braid::detail::fail(__FILE__, __LINE__, __VA_ARGS__)
