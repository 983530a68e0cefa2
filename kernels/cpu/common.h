// Shared by the CPU kernels (kernels/cpu.py compiles every .cc in this folder into one library).
#pragma once

#include <sched.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ditto {

// 16 floats: GCC/Clang vector extensions, so the compiler picks AVX-512, AVX2 or NEON from -march=native.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

// 16 bytes to 16 floats: widened to 32-bit integers first (one vpmovzxbd / vpmovsxbd and one vcvtdq2ps with
// AVX-512; converting bytes to floats directly was compiled to 16 scalar conversions).
inline v16 to_float(u8x16 b) { return __builtin_convertvector(__builtin_convertvector(b, vi16), v16); }
inline v16 to_float(i8x16 b) {
#ifdef __AVX512F__  // GCC 12 scalarises the signed widening below
  __m128i raw;
  std::memcpy(&raw, &b, sizeof raw);
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  v16 out;
  std::memcpy(&out, &f, sizeof out);
  return out;
#else
  return __builtin_convertvector(__builtin_convertvector(b, vi16), v16);
#endif
}
// Lane-wise comparisons (all-ones or zero lanes) and selection. GCC 12 compiles `<`, `==` and `?:` on these 64-byte
// vectors one lane at a time (16 scalar compares and branches) unless AVX-512 is on: without it they run here on the
// two 32-byte halves (exp_nonpositive on a 2-core AVX2 AMD EPYC: 2.8 -> 0.9 ns an element).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
template <typename V, typename Op> inline auto lanes(V a, V b, Op op) { return op(a, b); }
template <typename M, typename V> inline V select(M m, V a, V b) { return m ? a : b; }
#ifndef __AVX512F__
template <typename H, typename V> inline H half(const V& v, int i) {
  H h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof h * i, sizeof h);
  return h;
}
template <typename V, typename H> inline V whole(H lo, H hi) {
  V v;
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
}
template <typename Op> inline vi16 lanes(v16 a, v16 b, Op op) {
  return whole<vi16>(op(half<v8>(a, 0), half<v8>(b, 0)), op(half<v8>(a, 1), half<v8>(b, 1)));
}
template <typename Op> inline vi16 lanes(vi16 a, vi16 b, Op op) {
  return whole<vi16>(op(half<vi8>(a, 0), half<vi8>(b, 0)), op(half<vi8>(a, 1), half<vi8>(b, 1)));
}
inline v16 select(vi16 m, v16 a, v16 b) {
  return whole<v16>(half<vi8>(m, 0) ? half<v8>(a, 0) : half<v8>(b, 0),
                    half<vi8>(m, 1) ? half<v8>(a, 1) : half<v8>(b, 1));
}
#endif
template <typename V> inline auto less(V a, V b) { return lanes(a, b, [](auto x, auto y) { return x < y; }); }
template <typename V> inline auto greater(V a, V b) { return lanes(a, b, [](auto x, auto y) { return x > y; }); }
template <typename V> inline auto greater_eq(V a, V b) { return lanes(a, b, [](auto x, auto y) { return x >= y; }); }
template <typename V> inline auto equal(V a, V b) { return lanes(a, b, [](auto x, auto y) { return x == y; }); }
template <typename V> inline auto less_eq(V a, V b) { return lanes(a, b, [](auto x, auto y) { return x <= y; }); }
// a where a > b, else b (b where either is NaN)
template <typename V> inline V vmax(V a, V b) { return select(greater(a, b), a, b); }

// The host's own float vector (16 lanes with AVX-512, else 8), for loops that compare and select on every element;
// their lane sums differ in order from 16-lane loops', so loops that must agree bit for bit share one width.
#ifdef __AVX512F__
typedef v16 vn;
typedef vi16 vin;
#else
typedef v8 vn;
typedef vi8 vin;
#endif
constexpr int kLanes = sizeof(vn) / sizeof(float);
inline vn loadn(const float* p) { vn v; std::memcpy(&v, p, sizeof v); return v; }
inline void storen(float* p, vn v) { std::memcpy(p, &v, sizeof v); }
inline vin iota() {
  vin v;
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }
// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp; below -87 it returns ~0), on v16 or v8 lanes.
template <typename V> inline V exp_nonpositive(V x) {
  const V floor = V{} - 87.0f;
  x = select(less(x, floor), floor, x);
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  using VI = decltype(less(x, x));
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// The largest and the sum of a vector's lanes (the sum from lane 0 up).
template <typename V> inline float hmax(V v) {
  float m = v[0];
  for (int i = 1; i < static_cast<int>(sizeof(V) / sizeof(float)); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <typename V> inline float hsum(V v) {
  float s = 0.0f;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(float)); ++i) s += v[i];
  return s;
}

// max(x[0 .. n)) (-inf for n == 0), 16 lanes at a time (a scalar loop's compare-and-select chain took a third of
// the decode attention's time); the same value in any order (NaNs are skipped either way).
inline float row_max(const float* x, int64_t n) {
  const int64_t nv = n / 16 * 16;
  v16 m = splat(-INFINITY);
  for (int64_t i = 0; i < nv; i += 16) {
    const v16 v = load16(x + i);
    m = vmax(v, m);
  }
  float out = hmax(m);
  for (int64_t i = nv; i < n; ++i) out = x[i] > out ? x[i] : out;
  return out;
}

// row[s] = softmax(row * scale)[s] over s < n, in place (n >= 1), in float32.
inline void softmax_row(float* row, int64_t n, float scale) {
  const int64_t nv = n / 16 * 16;
  const float m = row_max(row, n) * scale;
  v16 tv{};
  for (int64_t s = 0; s < nv; s += 16) {
    const v16 e = exp_nonpositive(load16(row + s) * scale - m);
    store16(row + s, e);
    tv += e;
  }
  float total = hsum(tv);
  for (int64_t s = nv; s < n; ++s) total += (row[s] = std::exp(row[s] * scale - m));
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < n; ++s) row[s] *= inv;
}

// Ask for the cache line holding p in L2 (a hint: never faults, so it may point past the end of a buffer).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// Few-row matmuls over weights packed in tiles of 32 columns, [N / 32, K, 32] (small_matmul.cc, chunk_attention.cc).
constexpr int64_t kTile = 32;  // columns per packed tile

// One tile of packed float32 weights (small_matmul.cc has the GGUF-block sources with the same interface).
struct F32 {
  const float* w;  // tile [K, 32]
  void at_block(int64_t) {}
  void row(int64_t k, v16& w0, v16& w1) const { w0 = load16(w + k * kTile); w1 = load16(w + k * kTile + 16); }
  const void* prefetch_row(int64_t k) const { return w + k * kTile; }
  static constexpr int64_t kRowBytes = kTile * 4;
};

// Rows [0, R) of x against one tile; R <= 8 (a template, so the accumulators stay in registers). Each step of k
// prefetches the 64-byte lines of [pf + k * pf_step, pf + (k + 1) * pf_step), at least one (never faults: it may
// point past the end of the weight).
template <int R, typename Src>
void tile_rows(const float* x, int64_t ldx, Src src, int64_t k_len, float* y, int64_t ldy, const char* pf,
               int64_t pf_step) {
  v16 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) { acc0[r] = v16{}; acc1[r] = v16{}; }
  for (int64_t k0 = 0; k0 < k_len; k0 += kTile) {
    src.at_block(k0 / kTile);
    const int64_t k1 = k0 + kTile < k_len ? k0 + kTile : k_len;
    for (int64_t k = k0; k < k1; ++k) {
      prefetch(pf + k * pf_step);
      for (int64_t b = 64; b < pf_step; b += 64) prefetch(pf + k * pf_step + b);
      v16 w0, w1;
      src.row(k, w0, w1);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * ldx + k];
        acc0[r] += xv * w0;
        acc1[r] += xv * w1;
      }
    }
  }
  for (int r = 0; r < R; ++r) { store16(y + r * ldy, acc0[r]); store16(y + r * ldy + 16, acc1[r]); }
}

// Rows [0, m) of x against one tile, 8 rows at a time, no prefetching (operands already in cache).
template <typename Src>
void rows_against_tile(const float* x, int64_t ldx, int64_t m, Src src, int64_t k_len, float* y, int64_t ldy) {
  const char* pf = static_cast<const char*>(src.prefetch_row(0));
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    switch (m - r0 < 8 ? m - r0 : 8) {
      case 1: tile_rows<1>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 2: tile_rows<2>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 3: tile_rows<3>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 4: tile_rows<4>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 5: tile_rows<5>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 6: tile_rows<6>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      case 7: tile_rows<7>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
      default: tile_rows<8>(xr, ldx, src, k_len, yr, ldy, pf, 0); break;
    }
  }
}

// The kernels' worker threads: one fewer than the CPUs this process may run on (DITTO_CPU_KERNEL_THREADS
// overrides), started on first use. A decode step calls the kernels ~150 times, 0.05-0.3 ms each; waking a
// sleeping thread (or one of XLA's pool) for each call costs about as much as the call, so a worker spins for a
// short while after each job (SPIN_US) and only then sleeps. One job at a time: a call that finds the workers
// busy (another thread's kernel) runs alone on its own thread.
class Workers {
 public:
  static Workers& get() {
    static Workers* workers = new Workers();  // never destroyed: its threads outlive static destruction
    return *workers;
  }

  // The calling thread and the workers.
  int64_t size() const { return static_cast<int64_t>(threads_.size()) + 1; }

  // Run fn(i) for i in [0, n), `grab` indices at a time, on the calling thread and the workers.
  template <typename Fn>
  void run(int64_t n, int64_t grab, const Fn& fn) {
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock() || threads_.empty() || n <= grab) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    // generation_ is odd while the job's fields are written: no worker enters then, and none is left inside.
    generation_.fetch_add(1, std::memory_order_acq_rel);
    while (busy_.load(std::memory_order_acquire) > 0) pause();
    task_ = [](const void* ctx, int64_t i) { (*static_cast<const Fn*>(ctx))(i); };
    ctx_ = &fn;
    n_ = n;
    grab_ = grab;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) < n) pause();
    while (busy_.load(std::memory_order_acquire) > 0) pause();  // nobody still reads fn
  }

 private:
  static constexpr int64_t SPIN_US = 300;

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  Workers() {
    int64_t count = static_cast<int64_t>(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) count = CPU_COUNT(&set);
#endif
    if (const char* env = std::getenv("DITTO_CPU_KERNEL_THREADS")) count = std::atoll(env);
    for (int64_t i = 0; i + 1 < count; ++i) threads_.emplace_back([this] { loop(); }).detach();
  }

  void work() {
    for (;;) {
      const int64_t i0 = next_.fetch_add(grab_, std::memory_order_relaxed);
      if (i0 >= n_) return;
      const int64_t i1 = i0 + grab_ < n_ ? i0 + grab_ : n_;
      for (int64_t i = i0; i < i1; ++i) task_(ctx_, i);
      done_.fetch_add(i1 - i0, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    auto fresh = [&](uint64_t g) { return g != seen && g % 2 == 0; };  // a job ready to join
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
      uint64_t now = generation_.load(std::memory_order_acquire);
      while (!fresh(now) && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();  // a runnable XLA thread gets this core; otherwise back at once
        now = generation_.load(std::memory_order_acquire);
      }
      if (!fresh(now)) {
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return fresh(generation_.load(std::memory_order_acquire)); });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        now = generation_.load(std::memory_order_acquire);
        if (!fresh(now)) continue;
      }
      busy_.fetch_add(1, std::memory_order_acq_rel);
      if (generation_.load(std::memory_order_acquire) == now) {  // still that job: its fields are stable
        work();
        seen = now;
      }
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex job_mu_, sleep_mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleepers_{0}, busy_{0}, next_{0}, done_{0};
  void (*task_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0, grab_ = 1;
};

inline int64_t thread_count() { return Workers::get().size(); }

// OpenBLAS's cblas_sgemm (row-major), handed over by kernels/cpu.py through ditto_set_sgemm (gemm.cc); nullptr until
// then. The library runs one thread: callers split their work over the workers above.
typedef void (*Sgemm)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
inline Sgemm g_sgemm = nullptr;

// c[m, n] = alpha * op(a) @ op(b) + beta * c, row-major, op the transpose where asked.
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  g_sgemm(101, trans_a ? 112 : 111, trans_b ? 112 : 111, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Run fn(i) for i in [0, n) on the calling thread and the kernels' workers, `grab` indices at a time.
template <typename Fn>
void parallel_for(int64_t n, int64_t grab, const Fn& fn) {
  Workers::get().run(n, grab, fn);
}

}  // namespace ditto
