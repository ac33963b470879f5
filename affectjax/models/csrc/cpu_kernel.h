// What affectjax's native CPU kernels share (affectjax/models/csrc/*.cc):
// the vector type of the machine they are compiled on (-march=native) and
// the split of a kernel's work between XLA's CPU threads.
#ifndef AFFECTJAX_CPU_KERNEL_H_
#define AFFECTJAX_CPU_KERNEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace affectjax {

#if defined(__AVX512F__)
constexpr int kVL = 16;  // floats per vector
#elif defined(__AVX__)
constexpr int kVL = 8;
#else
constexpr int kVL = 4;
#endif

typedef float vf __attribute__((vector_size(kVL * sizeof(float))));

inline vf LoadU(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline void StoreU(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// Runs work(u) for every u in [0, units): on the calling thread and on up
// to threads - 1 tasks of XLA's pool, each claiming the next unit until
// none is left; returns when all are done. The caller never waits for a
// task that has not started (XLA may run a pool of one, or run tasks in
// the caller), and a task that starts after the call has returned finds
// no unit left and never touches `work`'s captures.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units,
                        std::function<void(int64_t)> work) {
  struct State {
    std::function<void(int64_t)> work;
    int64_t units;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  state->work = std::move(work);
  state->units = units;
  auto run = [](State* s) {
    for (;;) {
      const int64_t u = s->next.fetch_add(1, std::memory_order_relaxed);
      if (u >= s->units) return;
      s->work(u);
      s->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, units); ++t)
    pool.Schedule([state, run] { run(state.get()); });
  run(state.get());
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace affectjax

#endif  // AFFECTJAX_CPU_KERNEL_H_
