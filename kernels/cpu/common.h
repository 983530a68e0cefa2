// Shared by the CPU kernels (kernels/cpu.py compiles every .cc in this folder into one library).
#pragma once

#include <sched.h>
#if defined(__AVX512F__) || defined(__AVX2__)
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

// The host's own float vector (GCC/Clang vector extensions): 16 lanes with AVX-512, else 8. Every kernel loop runs
// on it: without AVX-512 GCC 12 compiled 16-float vectors' compares and selects one lane at a time and moved them
// through the stack in register-heavy loops (the decode kernels ran 3-11x slower than XLA's ops on an AVX2 AMD
// EPYC). Sums across lanes therefore differ in order between AVX-512 and other hosts (within float32 rounding);
// on one host every kernel that must agree bit for bit with another uses the same loops.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#ifdef __AVX512F__
typedef v16 vn;
typedef vi16 vin;
#else
typedef v8 vn;
typedef vi8 vin;
#endif
// Lane-wise comparisons of vn or vin (all-ones or zero lanes) and selection.
template <typename V> inline vin less(V a, V b) { return a < b; }
template <typename V> inline vin greater(V a, V b) { return a > b; }
template <typename V> inline vin greater_eq(V a, V b) { return a >= b; }
template <typename V> inline vin less_eq(V a, V b) { return a <= b; }
template <typename V> inline vin equal(V a, V b) { return a == b; }
inline vn select(vin m, vn a, vn b) { return m ? a : b; }
// a where a > b, else b (b where either is NaN)
inline vn vmax(vn a, vn b) { return select(greater(a, b), a, b); }
constexpr int kLanes = sizeof(vn) / sizeof(float);
inline vn loadn(const float* p) { vn v; std::memcpy(&v, p, sizeof v); return v; }
inline void storen(float* p, vn v) { std::memcpy(p, &v, sizeof v); }
inline vin iota() {
  vin v;
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}

// kLanes bytes from p, unsigned or signed, widened to 32-bit lanes (one vpmovzxbd / vpmovsxbd from memory; GCC 12
// compiled a direct byte-to-float conversion to scalar ones and scalarised the signed widening).
template <bool Signed> inline vin widen_bytes(const uint8_t* p) {
  vin out;
#if defined(__AVX512F__)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512i wide = Signed ? _mm512_cvtepi8_epi32(raw) : _mm512_cvtepu8_epi32(raw);
  std::memcpy(&out, &wide, sizeof out);
#elif defined(__AVX2__)
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m256i wide = Signed ? _mm256_cvtepi8_epi32(raw) : _mm256_cvtepu8_epi32(raw);
  std::memcpy(&out, &wide, sizeof out);
#else
  for (int l = 0; l < kLanes; ++l) out[l] = Signed ? static_cast<int8_t>(p[l]) : p[l];
#endif
  return out;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp; below -87 it returns ~0).
inline vn exp_nonpositive(vn x) {
  const vn floor = vn{} - 87.0f;
  x = select(less(x, floor), floor, x);
  const vn magic = vn{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vn n = (x * 1.44269504088896341f + magic) - magic;
  const vn r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vn p = vn{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vn y = p * r * r + r + 1.0f;
  const vin bits = (__builtin_convertvector(n, vin) + 127) << 23;
  vn scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// The largest and the sum of a vector's lanes (the sum from lane 0 up).
inline float hmax(vn v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float hsum(vn v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// max(x[0 .. n)) (-inf for n == 0), a vector at a time (a scalar loop's compare-and-select chain took a third of
// the decode attention's time); the same value in any order (NaNs are skipped either way).
inline float row_max(const float* x, int64_t n) {
  const int64_t nv = n / kLanes * kLanes;
  vn m = vn{} - INFINITY;
  for (int64_t i = 0; i < nv; i += kLanes) m = vmax(loadn(x + i), m);
  float out = hmax(m);
  for (int64_t i = nv; i < n; ++i) out = x[i] > out ? x[i] : out;
  return out;
}

// row[s] = softmax(row * scale)[s] over s < n, in place (n >= 1), in float32.
inline void softmax_row(float* row, int64_t n, float scale) {
  const int64_t nv = n / kLanes * kLanes;
  const float m = row_max(row, n) * scale;
  vn tv{};
  for (int64_t s = 0; s < nv; s += kLanes) {
    const vn e = exp_nonpositive(loadn(row + s) * scale - m);
    storen(row + s, e);
    tv += e;
  }
  float total = hsum(tv);
  for (int64_t s = nv; s < n; ++s) total += (row[s] = std::exp(row[s] * scale - m));
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < n; ++s) row[s] *= inv;
}

// Ask for the cache line holding p in L2 (a hint: never faults, so it may point past the end of a buffer).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// Few-row matmuls over weights packed in tiles of 32 columns, [N / 32, K, 32] (small_matmul.cc, chunk_attention.cc),
// on the host's own vectors: a tile row is kTileVecs of them (2 with AVX-512, 4 with AVX2).
constexpr int64_t kTile = 32;  // columns per packed tile
constexpr int kTileVecs = kTile / kLanes;
// Rows a pass keeps in registers, kTileVecs accumulators each: 8 x 2 of AVX-512's 32 registers, 3 x 4 of AVX2's 16
// (16-float accumulators on AVX2, 8 rows of them, were spilled to the stack on every step: 10x slower than XLA).
constexpr int kPassRows = kLanes == 16 ? 8 : 3;
// Rows of the pass that decodes quantised weights (small_matmul.cc), which needs two more registers.
constexpr int kDecodeRows = kLanes == 16 ? 8 : 2;

// One tile of packed float32 weights (small_matmul.cc has the GGUF-block sources with the same interface).
struct F32 {
  const float* w;  // tile [K, 32]
  void at_block(int64_t) {}
  void row(int64_t k, vn* out) const {
    for (int j = 0; j < kTileVecs; ++j) out[j] = loadn(w + k * kTile + j * kLanes);
  }
  const void* prefetch_row(int64_t k) const { return w + k * kTile; }
  static constexpr int64_t kRowBytes = kTile * 4;
};

// Rows [0, R) of x against one tile; R <= kPassRows (a template, so the accumulators stay in registers). Each step
// of k prefetches the 64-byte lines of [pf + k * pf_step, pf + (k + 1) * pf_step), at least one (never faults: it
// may point past the end of the weight). Every output is one chain of fused multiply-adds in the order of k, so
// the result does not depend on the vector width or on R.
template <int R, typename Src>
void tile_rows(const float* x, int64_t ldx, Src src, int64_t k_len, float* y, int64_t ldy, const char* pf,
               int64_t pf_step) {
  vn acc[R][kTileVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) acc[r][j] = vn{};
  for (int64_t k0 = 0; k0 < k_len; k0 += kTile) {
    src.at_block(k0 / kTile);
    const int64_t k1 = k0 + kTile < k_len ? k0 + kTile : k_len;
    for (int64_t k = k0; k < k1; ++k) {
      prefetch(pf + k * pf_step);
      for (int64_t b = 64; b < pf_step; b += 64) prefetch(pf + k * pf_step + b);
      vn w[kTileVecs];
      src.row(k, w);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * ldx + k];
        for (int j = 0; j < kTileVecs; ++j) acc[r][j] += xv * w[j];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) storen(y + r * ldy + j * kLanes, acc[r][j]);
}

// tile_rows<rows> for a run-time rows in [1, R].
template <int R = kPassRows, typename Src>
void tile_rows_upto(int64_t rows, const float* x, int64_t ldx, Src src, int64_t k_len, float* y, int64_t ldy,
                    const char* pf, int64_t pf_step) {
  if constexpr (R > 1)
    if (rows < R) return tile_rows_upto<R - 1>(rows, x, ldx, src, k_len, y, ldy, pf, pf_step);
  tile_rows<R>(x, ldx, src, k_len, y, ldy, pf, pf_step);
}

// Rows [0, m) of x against one tile, kPassRows rows at a time, no prefetching (operands already in cache).
template <typename Src>
void rows_against_tile(const float* x, int64_t ldx, int64_t m, Src src, int64_t k_len, float* y, int64_t ldy) {
  const char* pf = static_cast<const char*>(src.prefetch_row(0));
  for (int64_t r0 = 0; r0 < m; r0 += kPassRows)
    tile_rows_upto(m - r0, x + r0 * ldx, ldx, src, k_len, y + r0 * ldy, ldy, pf, 0);
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
