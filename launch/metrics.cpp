#include "launch/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>

#include "runtime/check.h"

namespace braid {

MetricsLog::MetricsLog(const std::string& path, bool append)
    : f_(std::fopen(path.c_str(), append ? "a" : "w")) {
  BRAID_CHECK(f_, "cannot write metrics file '", path, "': ", std::strerror(errno));
}

MetricsLog::~MetricsLog() {
  if (f_) std::fclose(f_);
}

void MetricsLog::write(const std::string& kind,
                       std::initializer_list<std::pair<const char*, double>> fields) {
  std::fprintf(f_, "{\"kind\": \"%s\"", kind.c_str());
  for (const auto& [k, v] : fields) {
    if (std::isfinite(v))
      std::fprintf(f_, ", \"%s\": %.9g", k, v);
    else
      std::fprintf(f_, ", \"%s\": null", k);
  }
  std::fprintf(f_, "}\n");
  std::fflush(f_);
}

}  // namespace braid
