// The runtime of the host emulation (cuda/emulation.h) and a C interface to the
// CUDA launchers for tests: build with
//   g++ -std=c++20 -DOLMO2_CUDA_EMULATION -I csrc -I <cuda>/include -x c++ csrc/cuda/*.cu \
//       -x none csrc/cuda/emulation.cpp -shared -fPIC -o libolmo2_cuda_emulation.so
// and call olmo2_emu_<kernel>(const Params*) (one per entry point of the op
// table, common/op_table.h) on host pointers; each returns 0, or 1 with the
// message in olmo2_emu_last_error(). olmo2_emu_param_layouts() describes the
// structs (JSON). Not part of the extension (CMake builds only csrc/cuda/*.cu,
// with nvcc).
#ifndef OLMO2_CUDA_EMULATION
#error "emulation.cpp is built with -DOLMO2_CUDA_EMULATION"
#endif

#include <ucontext.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/param_layout.h"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

// ---- the few runtime API calls the launchers make -------------------------------------
extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
extern "C" cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

namespace olmo2::emulation {
namespace {

constexpr size_t kStackBytes = 64 * 1024;

enum class State { kReady, kAtBarrier, kDone };

struct Block {
  std::vector<ucontext_t> contexts;
  std::vector<std::vector<char>> stacks;
  std::vector<State> states;
  std::vector<float> exchange;  // shuffle buffer, one slot per thread
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;
const void* g_misaligned = nullptr;  // first misaligned vector access of the launch
size_t g_misaligned_bytes = 0;

void thread_entry() {
  Block& b = *g_block;
  (*b.body)();
  b.states[b.current] = State::kDone;
  // returning resumes uc_link (the scheduler)
}

void set_thread_index(int linear) {
  thread_idx.x = linear % block_dim.x;
  thread_idx.y = (linear / block_dim.x) % block_dim.y;
  thread_idx.z = linear / (block_dim.x * block_dim.y);
}

}  // namespace

void check_aligned(const void* ptr, size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0 && g_misaligned == nullptr) {
    g_misaligned = ptr;
    g_misaligned_bytes = bytes;
  }
}

void syncthreads() {
  Block& b = *g_block;
  b.states[b.current] = State::kAtBarrier;
  swapcontext(&b.contexts[b.current], &b.scheduler);
}

float shfl_xor(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) throw std::logic_error("emulation: only full-warp shuffles are emulated");
  Block& b = *g_block;
  const int self = b.current;
  b.exchange[self] = value;
  syncthreads();
  const int lane = self % 32;
  const float result = b.exchange[self - lane + (lane ^ lane_mask)];
  syncthreads();
  return result;
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) throw std::invalid_argument("emulation: block size out of range");
  if (threads % 32) throw std::invalid_argument("emulation: block size is not a multiple of the warp size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::invalid_argument("emulation: empty grid");
  Block b;
  b.contexts.resize(threads);
  b.stacks.assign(threads, std::vector<char>(kStackBytes));
  b.states.resize(threads);
  b.exchange.assign(threads, 0.0f);
  b.body = &body;
  Block* saved = g_block;
  g_block = &b;
  g_misaligned = nullptr;
  block_dim = block;
  grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        for (int t = 0; t < threads; ++t) {
          getcontext(&b.contexts[t]);
          b.contexts[t].uc_stack.ss_sp = b.stacks[t].data();
          b.contexts[t].uc_stack.ss_size = kStackBytes;
          b.contexts[t].uc_link = &b.scheduler;
          makecontext(&b.contexts[t], thread_entry, 0);
          b.states[t] = State::kReady;
        }
        for (;;) {
          int done = 0;
          for (int t = 0; t < threads; ++t) {
            if (b.states[t] == State::kDone) {
              ++done;
              continue;
            }
            b.current = t;
            set_thread_index(t);
            b.states[t] = State::kReady;
            swapcontext(&b.scheduler, &b.contexts[t]);
          }
          int finished = 0;
          for (int t = 0; t < threads; ++t) finished += b.states[t] == State::kDone;
          if (finished == threads) break;
          if (finished > 0) {
            g_block = saved;
            throw std::logic_error("emulation: divergent __syncthreads (some threads exited at a barrier)");
          }
          (void)done;
        }
      }
  g_block = saved;
  if (g_misaligned != nullptr)
    throw std::logic_error("emulation: misaligned address: a " + std::to_string(g_misaligned_bytes) +
                           "-byte vector access at " + std::to_string(reinterpret_cast<std::uintptr_t>(g_misaligned)));
}

}  // namespace olmo2::emulation

// ---- C interface for tests ---------------------------------------------------------------
namespace {
thread_local std::string g_error;

template <typename Fn>
int guarded(Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
}  // namespace

extern "C" {
const char* olmo2_emu_last_error() { return g_error.c_str(); }

// The parameter structs' layout (common/param_layout.h) as JSON: the ctypes
// mirror of tests/cuda_emulation.py is built from it.
const char* olmo2_emu_param_layouts() {
  static const std::string json = olmo2::param_layouts_json();
  return json.c_str();
}

// int olmo2_emu_<kernel>(const <Params>* p) per entry point of the op table.
#define OLMO2_EMU_ENTRY(kernel, Params, ...)                                 \
  int olmo2_emu_##kernel(const olmo2::Params* p) {                           \
    return guarded([&] { olmo2::cuda::kernel(*p, nullptr); });              \
  }
OLMO2_OPS(OLMO2_EMU_ENTRY)
#undef OLMO2_EMU_ENTRY
}
