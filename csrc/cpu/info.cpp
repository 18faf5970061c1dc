// Build-time facts about the CPU kernels (threading), queried by the bindings,
// and the thread count the kernels use.
#include "cpu/info.h"

#include <atomic>

#include "cpu/kernels.h"

#ifdef OLMO2_HAVE_OPENMP
#include <omp.h>
#endif

namespace olmo2::cpu {

namespace {
std::atomic<int> g_threads{0};  // 0: OpenMP's default
}

bool has_openmp() {
#ifdef OLMO2_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef OLMO2_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0); }

int num_threads() {
  const int n = g_threads.load();
  return n > 0 ? n : max_threads();
}

}  // namespace olmo2::cpu
