// y[M, N] = x[M, K] @ w for few rows M (decoding), w pre-packed as [N / 32, K, 32] float32 (kernels/cpu.py).
//
// XLA's CPU dot reads a [K, N] weight at 13-18 GB/s when x has 8-16 rows (its kernels are built for large M);
// this loop streams the packed weight tile by tile (each 32-column tile contiguous, so the hardware prefetcher and
// the TLB see one linear read) at close to the machine's memory bandwidth.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using ditto::F32;
using ditto::kTile;
using ditto::kTileVecs;
using ditto::vn;

namespace {

// Bytes of the tile requested this far ahead of use (16 float rows): the hardware prefetchers alone kept one thread
// at 7.6 GB/s of a 12.5 GB/s read rate on a 2-core Xeon VM (sapphire rapids class), 10.5 with this; no change on
// Zen 4.
constexpr int64_t kAheadBytes = 2048;

// Where a tile's weights come from: ditto::F32 (common.h) reads packed floats; Quant decodes GGUF-style blocks in registers,
// w = q * d + m with q a 4-bit (Bits 4, unsigned) or 8-bit (Bits 8, signed) integer and d, m per 32 rows of k
// and column. For the GGUF formats kept (Q4_0, Q4_1, Q8_0) q * d is exact in float32, so w is bit for bit the
// float32 value their dequantisation gives, and the sums below are the float kernel's, in the same order.
template <int Bits>
struct Quant {
  const uint8_t* q;    // tile [K, 32 * Bits / 8]: 4 bits, byte j holds column j (low nibble) and j + 16 (high)
  const float* d;      // tile [K / 32, 32]
  const float* m;      // tile [K / 32, 32]
  vn dv[kTileVecs], mv[kTileVecs];
  static constexpr int kHalf = 16 / ditto::kLanes;  // vectors in 16 columns
  void at_block(int64_t kb) {
    for (int j = 0; j < kTileVecs; ++j) {
      dv[j] = ditto::loadn(d + kb * kTile + j * ditto::kLanes);
      mv[j] = ditto::loadn(m + kb * kTile + j * ditto::kLanes);
    }
  }
  void row(int64_t k, vn* w) const {
    for (int j = 0; j < kTileVecs; ++j) w[j] = vec(k, j);
  }
  vn vec(int64_t k, int j) const {
    ditto::vin v;
    if constexpr (Bits == 4) {  // columns [16 h, 16 h + 16): the low (h = 0) or high (1) nibbles of the 16 bytes
      const int h = j / kHalf;
      v = ditto::widen_bytes<false>(q + k * 16 + (j % kHalf) * ditto::kLanes);
      v = h ? v >> 4 : v & 15;
    } else {
      v = ditto::widen_bytes<true>(q + k * 32 + j * ditto::kLanes);
    }
    return __builtin_convertvector(v, vn) * dv[j] + mv[j];
  }
  const void* prefetch_row(int64_t k) const { return q + k * (kTile * Bits / 8); }
  static constexpr int64_t kRowBytes = kTile * Bits / 8;
};

// A source that also keeps what it reads: the tile's decoded float32 rows, written to `out` [K, 32].
template <typename Src>
struct Keeping {
  Src src;
  float* out;
  void at_block(int64_t kb) { src.at_block(kb); }
  void row(int64_t k, vn* w) const {
    src.row(k, w);
    for (int j = 0; j < kTileVecs; ++j) ditto::storen(out + k * kTile + j * ditto::kLanes, w[j]);
  }
  const void* prefetch_row(int64_t k) const { return src.prefetch_row(k); }
  static constexpr int64_t kRowBytes = Src::kRowBytes;
};

// All m rows of x against tile t (src set to that tile), in passes of kPassRows rows (the first one of kDecodeRows
// where it decodes blocks for later passes); `first`: no earlier call prefetched it.
template <typename Src>
void tile_all_rows(const float* x, Src src, int64_t tile_bytes, float* y, int64_t m, int64_t k_len, int64_t n,
                   int64_t t, bool first) {
  const char* wt = static_cast<const char*>(src.prefetch_row(0));
  // Quantised weights are decoded once: the first pass keeps the tile's floats, the others read them (decoding in
  // every pass: Q8 23.1 -> 21.0 ms, Q4 25.1 -> 20.4 ms for SmolLM2-135M's 8-row decode matmuls, AVX2 EPYC). That
  // first pass holds fewer rows where more passes follow: with AVX2, 3 rows' accumulators and a block's d and m
  // need 17 registers, and the spilled accumulators went through the stack every step.
  constexpr bool kDecodes = !std::is_same_v<Src, F32>;
  const int64_t lead = kDecodes && m > ditto::kPassRows ? ditto::kDecodeRows : ditto::kPassRows;
  const int64_t passes = m > lead ? 1 + (m - lead + ditto::kPassRows - 1) / ditto::kPassRows : 1;
  // A tile that nobody prefetched is streamed from memory by its first pass, kAheadBytes ahead. With more than one
  // pass the passes after it find the tile in L2, so they (all of them when the tile was prefetched) share the
  // fetching of the next tile, each a contiguous part: memory then never idles while passes compute (only the
  // last pass fetching the next tile left it idle half the time with 16 rows: 14 GB/s against 8 rows' 19).
  const int64_t own = first ? 1 : 0, sharing = passes - own;
  const int64_t part_step = sharing > 0 ? (Src::kRowBytes + sharing - 1) / sharing : 0;
  thread_local std::vector<float> decoded;  // [K, 32]
  if (kDecodes && passes > 1) decoded.resize(k_len * kTile);
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t r0 = p == 0 ? 0 : lead + ditto::kPassRows * (p - 1);
    const int64_t rows = std::min<int64_t>(m - r0, p == 0 ? lead : ditto::kPassRows);
    const float* xr = x + r0 * k_len;
    float* yr = y + r0 * n + t * kTile;
    const bool streams_own = p < own;
    const char* pf = streams_own ? wt + kAheadBytes : wt + tile_bytes + (p - own) * part_step * k_len;
    const int64_t step = streams_own ? Src::kRowBytes : part_step;
    if (!kDecodes || passes == 1)
      ditto::tile_rows_upto(rows, xr, k_len, src, k_len, yr, n, pf, step);
    else if (p == 0)
      ditto::tile_rows_upto(rows, xr, k_len, Keeping<Src>{src, decoded.data()}, k_len, yr, n, pf, step);
    else
      ditto::tile_rows_upto(rows, xr, k_len, F32{decoded.data()}, k_len, yr, n, pf, step);
  }
}

// Each thread streams a few long contiguous runs of tiles (one tile at a time measured 10-20% slower: the
// prefetchers see short runs); two runs per thread still balance a late starter. fn(t, first): first is true for
// the first tile of a run.
template <typename Fn>
void over_tiles(int64_t tiles, const Fn& fn) {
  const int64_t runs = 2 * ditto::thread_count(), grab = (tiles + runs - 1) / runs;
  ditto::parallel_for(tiles, grab, [&](int64_t t) { fn(t, t % grab == 0); });
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
  over_tiles(tiles, [=](int64_t t, bool first) {
    tile_all_rows(xp, F32{wp + t * k * kTile}, k * kTile * 4, yp, m, k, n, t, first);
  });
  return ffi::Error::Success();
}

template <int Bits>
ffi::Error QuantMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> d,
                           ffi::Buffer<ffi::F32> mins, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), qd = q.dimensions(), dd = d.dimensions(), yd = y->dimensions();
  const int64_t row_bytes = kTile * Bits / 8;
  if (xd.size() != 2 || qd.size() != 3 || dd.size() != 3 || yd.size() != 2 || qd[2] != row_bytes ||
      dd[2] != kTile || mins.dimensions().size() != 3 || q.size_bytes() != q.element_count())
    return ffi::Error::InvalidArgument("small_matmul (quantised): want x [M, K], q 8-bit [N/32, K, 32*bits/8], "
                                       "d and m [N/32, K/32, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], tiles = qd[0], blocks = (k + kTile - 1) / kTile;
  const auto md = mins.dimensions();
  if (qd[1] != k || dd[0] != tiles || dd[1] != blocks || md[0] != tiles || md[1] != blocks || md[2] != kTile ||
      yd[0] != m || n != tiles * kTile)
    return ffi::Error::InvalidArgument("small_matmul (quantised): shapes disagree");
  const float* xp = x.typed_data();
  const uint8_t* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float *dp = d.typed_data(), *mp = mins.typed_data();
  float* yp = y->typed_data();
  over_tiles(tiles, [=](int64_t t, bool first) {
    Quant<Bits> src{qp + t * k * row_bytes, dp + t * blocks * kTile, mp + t * blocks * kTile};
    tile_all_rows(xp, src, k * row_bytes, yp, m, k, n, t, first);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define DITTO_QUANT_HANDLER(NAME, BITS)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, QuantMatmulImpl<BITS>,    \
                                ffi::Ffi::Bind()                \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::AnyBuffer>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());
DITTO_QUANT_HANDLER(DittoSmallMatmulQ4, 4)
DITTO_QUANT_HANDLER(DittoSmallMatmulQ8, 8)
