// JSONL metrics: one JSON object per line, flushed after each record so a killed run keeps what
// it logged.
#pragma once

#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>

namespace braid {

class MetricsLog {
 public:
  // append: continue an existing log (a resumed run).
  MetricsLog(const std::string& path, bool append);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const std::string& kind, std::initializer_list<std::pair<const char*, double>> fields);

 private:
  FILE* f_ = nullptr;
};

}  // namespace braid
