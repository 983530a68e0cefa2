// y[M, N] = x[M, K] @ w for few rows M (decoding), w pre-packed as [N / 32, K, 32] float32 (kernels/cpu_matmul.py).
//
// Why: XLA's CPU dot reads a [K, N] weight at 13-18 GB/s when x has 8-16 rows (its kernels are built for large M);
// this loop streams the packed weight tile by tile (each 32-column tile contiguous, so the hardware prefetcher and
// the TLB see one linear read) at the machine's memory bandwidth. Tiles are shared between the calling thread and
// XLA's intra-op thread pool through an atomic counter; the caller never waits for a helper that has not started a
// tile, so it completes even when the pool is busy. Written with GCC/Clang vector extensions (no intrinsics): the
// compiler picks AVX-512, AVX2 or NEON from -march=native.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;                      // columns per packed tile
typedef float v16 __attribute__((vector_size(64)));  // half a tile

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Rows [0, R) of x against one packed tile wt [K, 32]; R <= 8 (a template, so the accumulators stay in registers).
template <int R>
void tile_rows(const float* x, int64_t ldx, const float* wt, int64_t k_len, float* y, int64_t ldy) {
  v16 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) { acc0[r] = v16{}; acc1[r] = v16{}; }
  for (int64_t k = 0; k < k_len; ++k) {
    __builtin_prefetch(wt + (k + 24) * kTile);
    __builtin_prefetch(wt + (k + 24) * kTile + 16);
    const v16 w0 = load16(wt + k * kTile), w1 = load16(wt + k * kTile + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      acc0[r] += xv * w0;
      acc1[r] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) { store16(y + r * ldy, acc0[r]); store16(y + r * ldy + 16, acc1[r]); }
}

void tile_all_rows(const float* x, const float* w, float* y, int64_t m, int64_t k_len, int64_t n, int64_t t) {
  const float* wt = w + t * k_len * kTile;
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    const float* xr = x + r0 * k_len;
    float* yr = y + r0 * n + t * kTile;
    switch (m - r0 < 8 ? m - r0 : 8) {
      case 1: tile_rows<1>(xr, k_len, wt, k_len, yr, n); break;
      case 2: tile_rows<2>(xr, k_len, wt, k_len, yr, n); break;
      case 3: tile_rows<3>(xr, k_len, wt, k_len, yr, n); break;
      case 4: tile_rows<4>(xr, k_len, wt, k_len, yr, n); break;
      case 5: tile_rows<5>(xr, k_len, wt, k_len, yr, n); break;
      case 6: tile_rows<6>(xr, k_len, wt, k_len, yr, n); break;
      case 7: tile_rows<7>(xr, k_len, wt, k_len, yr, n); break;
      default: tile_rows<8>(xr, k_len, wt, k_len, yr, n); break;
    }
  }
}

struct Job {
  const float* x; const float* w; float* y;
  int64_t m, k, n, tiles, per_grab;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      const int64_t t0 = next.fetch_add(per_grab, std::memory_order_relaxed);
      if (t0 >= tiles) return;
      const int64_t t1 = t0 + per_grab < tiles ? t0 + per_grab : tiles;
      for (int64_t t = t0; t < t1; ++t) tile_all_rows(x, w, y, m, k, n, t);
      done.fetch_add(t1 - t0, std::memory_order_release);
    }
  }
};

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile)
    return ffi::Error::InvalidArgument("small_matmul: want x [M, K], w [N/32, K, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (wd[1] != k || yd[0] != m || n != wd[0] * kTile)
    return ffi::Error::InvalidArgument("small_matmul: shapes disagree (x [M, K], w [N/32, K, 32], y [M, N])");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data(); job->w = w.typed_data(); job->y = y->typed_data();
  job->m = m; job->k = k; job->n = n; job->tiles = wd[0];
  const int64_t helpers = pool.num_threads() > 1 ? pool.num_threads() - 1 : 0;
  // Small grabs balance the threads; a grab of several tiles keeps the shared counter cold.
  job->per_grab = job->tiles >= 64 * (helpers + 1) ? 4 : 1;
  for (int64_t i = 0; i < helpers && i + 1 < job->tiles; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->tiles) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
