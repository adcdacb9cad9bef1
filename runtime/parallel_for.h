// parallel_for(n, f): calls f(i) for i in [0, n) split statically over OpenMP threads. Each f(i)
// must write only its own outputs, so results never depend on the thread count.
#pragma once

#include <cstdint>

namespace braid {

template <typename F>
void parallel_for(int64_t n, F&& f) {
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace braid
