// y[M, N] = x[M, K] @ w for few rows M (decoding), w pre-packed as [N / 32, K, 32] float32 (kernels/cpu.py).
//
// XLA's CPU dot reads a [K, N] weight at 13-18 GB/s when x has 8-16 rows (its kernels are built for large M);
// this loop streams the packed weight tile by tile (each 32-column tile contiguous, so the hardware prefetcher and
// the TLB see one linear read) at close to the machine's memory bandwidth.
#include "common.h"

namespace ffi = xla::ffi;
using ditto::v16;

namespace {

constexpr int64_t kTile = 32;  // columns per packed tile
// Rows of the tile requested this far ahead of use (2 KiB): the hardware prefetchers alone kept one thread at 7.6
// GB/s of a 12.5 GB/s read rate on a 2-core Xeon VM (sapphire rapids class), 10.5 with this; no change on Zen 4.
constexpr int64_t kAhead = 16;

// Rows [0, R) of x against one packed tile wt [K, 32]; R <= 8 (a template, so the accumulators stay in registers).
// Row k of the loop prefetches pf + k * 32 (never faults: it may point past the end of the weight).
template <int R>
void tile_rows(const float* x, int64_t ldx, const float* wt, int64_t k_len, float* y, int64_t ldy,
               const float* pf) {
  v16 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) { acc0[r] = v16{}; acc1[r] = v16{}; }
  for (int64_t k = 0; k < k_len; ++k) {
    ditto::prefetch(pf + k * kTile);
    ditto::prefetch(pf + k * kTile + 16);
    const v16 w0 = ditto::load16(wt + k * kTile), w1 = ditto::load16(wt + k * kTile + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      acc0[r] += xv * w0;
      acc1[r] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) { ditto::store16(y + r * ldy, acc0[r]); ditto::store16(y + r * ldy + 16, acc1[r]); }
}

void tile_all_rows(const float* x, const float* w, float* y, int64_t m, int64_t k_len, int64_t n, int64_t t) {
  const float* wt = w + t * k_len * kTile;
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    const float* xr = x + r0 * k_len;
    float* yr = y + r0 * n + t * kTile;
    // The first pass streams the tile from memory, kAhead rows ahead; later passes (more than 8 rows) find it in
    // L2, so the last one fetches the next tile meanwhile (else memory idles while they compute: 16 rows ran
    // 23% slower than 8) and the middle ones prefetch nothing new (the tile itself).
    const float* pf = r0 == 0 ? wt + kAhead * kTile : r0 + 8 >= m ? wt + k_len * kTile : wt;
    switch (m - r0 < 8 ? m - r0 : 8) {
      case 1: tile_rows<1>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 2: tile_rows<2>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 3: tile_rows<3>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 4: tile_rows<4>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 5: tile_rows<5>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 6: tile_rows<6>(xr, k_len, wt, k_len, yr, n, pf); break;
      case 7: tile_rows<7>(xr, k_len, wt, k_len, yr, n, pf); break;
      default: tile_rows<8>(xr, k_len, wt, k_len, yr, n, pf); break;
    }
  }
}

ffi::Error SmallMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile)
    return ffi::Error::InvalidArgument("small_matmul: want x [M, K], w [N/32, K, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], tiles = wd[0];
  if (wd[1] != k || yd[0] != m || n != tiles * kTile)
    return ffi::Error::InvalidArgument("small_matmul: shapes disagree (x [M, K], w [N/32, K, 32], y [M, N])");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  // Each thread streams a few long contiguous runs of tiles (one tile at a time measured 10-20% slower: the
  // prefetchers see short runs); two runs per thread still balance a late starter.
  const int64_t runs = 2 * ditto::thread_count();
  const int64_t grab = (tiles + runs - 1) / runs;
  ditto::parallel_for(tiles, grab, [=](int64_t t) { tile_all_rows(xp, wp, yp, m, k, n, t); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
