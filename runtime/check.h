// Checked calls and errors. Every failure becomes a braid::Error. Internal checks and library
// calls (BRAID_CHECK, BRAID_FAIL, CUDA_CHECK, ...) start the message with Braid's "file:line:";
// rejected user input (BRAID_REQUIRE, BRAID_REJECT) names the config key, file or offset instead.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace braid {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A device allocation that does not fit (the message says how much was asked and free).
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": ";
  (os << ... << args);
  throw Error(os.str());
}
// Errors in what a user gave (configs, data files, layouts): the message names the file, key or
// offset at fault, without Braid's source location.
template <typename... Args>
[[noreturn]] void reject(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}
}  // namespace detail

}  // namespace braid

// BRAID_CHECK(cond, "message parts", ...): throws braid::Error("file:line: message parts").
#define BRAID_CHECK(cond, ...)                                           \
  do {                                                                   \
    if (!(cond)) ::braid::detail::fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#define BRAID_FAIL(...) ::braid::detail::fail(__FILE__, __LINE__, __VA_ARGS__)

// BRAID_REQUIRE(cond, ...) / BRAID_REJECT(...): the same for invalid user input, no location.
#define BRAID_REQUIRE(cond, ...)                       \
  do {                                                 \
    if (!(cond)) ::braid::detail::reject(__VA_ARGS__); \
  } while (0)
#define BRAID_REJECT(...) ::braid::detail::reject(__VA_ARGS__)
