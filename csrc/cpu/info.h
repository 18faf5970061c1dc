#pragma once

namespace olmo2::cpu {
bool has_openmp();
int max_threads();
}  // namespace olmo2::cpu
