// Learning-rate schedules, as a function of the 0-based step:
//   warmup:   lr = peak * (step + 1) / warmup                          for step < warmup
//   cosine:   min + (peak - min) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
//   wsd:      peak until the last `decay` steps, then linear from peak to min (warmup-stable-decay)
//   constant: peak
#pragma once

#include <cstdint>
#include <string>

namespace braid {

struct LrSchedule {
  enum class Kind { cosine, wsd, constant } kind = Kind::cosine;
  double peak = 1e-3;
  double min = 1e-4;
  int64_t warmup = 0;
  int64_t total = 1;
  int64_t decay = 0;  // wsd only

  double at(int64_t step) const;
  void validate() const;  // errors name the optim.* key
};

bool lr_kind_from_name(const std::string& name, LrSchedule::Kind* out);
const char* lr_kind_name(LrSchedule::Kind k);

}  // namespace braid
