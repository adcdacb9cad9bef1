#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "runtime/check.h"

namespace braid {

double LrSchedule::at(int64_t step) const {
  if (step < warmup) return peak * double(step + 1) / double(warmup);
  switch (kind) {
    case Kind::constant:
      return peak;
    case Kind::cosine: {
      const double p = std::clamp(
          double(step - warmup) / double(std::max<int64_t>(1, total - warmup)), 0.0, 1.0);
      return min + (peak - min) * 0.5 * (1.0 + std::cos(M_PI * p));
    }
    case Kind::wsd: {
      const int64_t start = total - decay;
      if (step < start) return peak;
      const double p =
          std::clamp(double(step - start + 1) / double(std::max<int64_t>(1, decay)), 0.0, 1.0);
      return peak + (min - peak) * p;
    }
  }
  return peak;
}

void LrSchedule::validate() const {
  BRAID_REQUIRE(peak > 0, "optim.lr = ", peak, " must be positive");
  BRAID_REQUIRE(min >= 0 && min <= peak, "optim.min_lr = ", min, " must be in [0, optim.lr]");
  BRAID_REQUIRE(warmup >= 0 && warmup <= total, "optim.warmup = ", warmup,
                " must be in [0, train.steps = ", total, "]");
  if (kind == Kind::wsd)
    BRAID_REQUIRE(decay >= 0 && decay <= total - warmup, "optim.decay_steps = ", decay,
                  " must be in [0, train.steps - optim.warmup = ", total - warmup, "]");
}

bool lr_kind_from_name(const std::string& name, LrSchedule::Kind* out) {
  if (name == "cosine") return *out = LrSchedule::Kind::cosine, true;
  if (name == "wsd") return *out = LrSchedule::Kind::wsd, true;
  if (name == "constant") return *out = LrSchedule::Kind::constant, true;
  return false;
}

const char* lr_kind_name(LrSchedule::Kind k) {
  return k == LrSchedule::Kind::cosine ? "cosine" : k == LrSchedule::Kind::wsd ? "wsd" : "constant";
}

}  // namespace braid
