// The entry points of kernels.h: each forwards to the build of the kernels for
// the active instruction set (cpu/isa.h). Compiled for the baseline ISA, like
// everything outside the per-ISA builds, so loading the module never executes
// an instruction the processor lacks.
#include <atomic>
#include <stdexcept>

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace olmo2::cpu {
namespace {

enum Isa : int { kBaseline = 0, kAvx2 = 1 };

bool built(Isa isa) {
  if (isa == kBaseline) return true;
#ifdef OLMO2_CPU_HAVE_AVX2
  return isa == kAvx2;
#else
  return false;
#endif
}

bool supported(Isa isa) {
  if (!built(isa)) return false;
  if (isa == kBaseline) return true;
#if defined(OLMO2_CPU_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const char* name_of(Isa isa) { return isa == kAvx2 ? "avx2" : "baseline"; }

Isa best() { return supported(kAvx2) ? kAvx2 : kBaseline; }

std::atomic<int>& active() {
  static std::atomic<int> isa{best()};
  return isa;
}

// Calls isa_avx2::fn or isa_baseline::fn with the same arguments.
#ifdef OLMO2_CPU_HAVE_AVX2
#define OLMO2_CPU_FORWARD(fn, ...)                                   \
  do {                                                               \
    if (active().load(std::memory_order_relaxed) == kAvx2) {         \
      isa_avx2::fn(__VA_ARGS__);                                     \
    } else {                                                         \
      isa_baseline::fn(__VA_ARGS__);                                 \
    }                                                                \
  } while (0)
#else
#define OLMO2_CPU_FORWARD(fn, ...) isa_baseline::fn(__VA_ARGS__)
#endif

}  // namespace

std::vector<std::string> cpu_isas_built() {
  std::vector<std::string> out;
  for (Isa isa : {kBaseline, kAvx2})
    if (built(isa)) out.emplace_back(name_of(isa));
  return out;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (Isa isa : {kBaseline, kAvx2})
    if (supported(isa)) out.emplace_back(name_of(isa));
  return out;
}

std::string cpu_isa() { return name_of(static_cast<Isa>(active().load())); }

void set_cpu_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") {
    isa = best();
  } else if (name == "baseline") {
    isa = kBaseline;
  } else if (name == "avx2") {
    isa = kAvx2;
    if (!built(isa)) {
      throw std::invalid_argument("cpu ISA 'avx2': this build of the extension has no AVX2 kernels "
                                  "(compiler without -mavx2 -mfma, or not an x86-64 build)");
    }
    if (!supported(isa)) {
      throw std::invalid_argument("cpu ISA 'avx2': this processor does not report both AVX2 and FMA");
    }
  } else {
    throw std::invalid_argument("cpu ISA '" + name + "': expected one of 'auto', 'baseline', 'avx2'");
  }
  active().store(isa);
}

#define OLMO2_CPU_DISPATCH(kernel, Params, ...) \
  void kernel(const Params& p) { OLMO2_CPU_FORWARD(kernel, p); }
OLMO2_OPS(OLMO2_CPU_DISPATCH)
#undef OLMO2_CPU_DISPATCH
void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  OLMO2_CPU_FORWARD(cast, src, src_dtype, dst, dst_dtype, n);
}

}  // namespace olmo2::cpu
