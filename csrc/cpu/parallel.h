// Static partition of rows over OpenMP threads: thread t of T gets the
// contiguous range [n*t/T, n*(t+1)/T). Fixed partitions make results (e.g. the
// order of a weight-gradient reduction) depend only on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef OLMO2_HAVE_OPENMP
#include <omp.h>
#endif

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace olmo2::cpu::OLMO2_CPU_ISA {

// Below this many elements of work a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

// How many threads a loop over `items` items of `work_per_item` elements uses.
inline int threads_for(int64_t items, int64_t work_per_item) {
  const int64_t work = items * std::max<int64_t>(work_per_item, 1);
  if (items <= 1 || work < kMinParallelWork) return 1;
  return static_cast<int>(std::min<int64_t>(num_threads(), items));
}

// Calls fn(begin, end, thread) on `threads` disjoint ranges covering [0, items).
// fn must not throw (exceptions cannot leave an OpenMP region).
template <typename Fn>
inline void parallel_ranges(int64_t items, int threads, Fn&& fn) {
  if (items <= 0) return;
  if (threads <= 1) {
    fn(int64_t{0}, items, 0);
    return;
  }
#ifdef OLMO2_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int n = omp_get_num_threads();
    fn(items * t / n, items * (t + 1) / n, t);
  }
#else
  fn(int64_t{0}, items, 0);
#endif
}

}  // namespace olmo2::cpu::OLMO2_CPU_ISA
