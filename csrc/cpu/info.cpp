// Build-time facts about the CPU kernels (threading), queried by the bindings.
#include "cpu/info.h"

#ifdef OLMO2_HAVE_OPENMP
#include <omp.h>
#endif

namespace olmo2::cpu {

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

}  // namespace olmo2::cpu
