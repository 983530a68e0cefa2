// T new tokens per row against a KV cache that already holds them (the prompt phases: prefill after a cached
// prefix, a prompt chunk, a prefix fill; kernels/cpu.py), causal, float32:
//   o[b, t, h * G + g, :] = softmax_s(q[b, t, h * G + g, :] . k[layer, b, s, h, :] * scale) v[layer, b, s, h, :]
// over s <= q_offset[b] + t (and s < S), q [B, T, Hq, D], k and v [L, B, S, Hkv, D] (the model's stacked cache,
// read in place at `layer`), q_offset [B] int32.
//
// XLA ran both products as batched einsums at ~45 GFLOP/s here (SmolLM2-135M, 8 rows of 32 tokens after a 384-
// position prefix) and scored every query against every key. Here a task is (row, kv head, some blocks of 32
// queries): it packs the keys its blocks can see ([n / 32, D, 32], transposed) and the values ([D / 32, n, 32])
// into tiles and runs both products as few-row matmuls against them (the decode matmul's register tiling,
// common.h), the G query heads of the kv head and a block's queries as rows; a block reads only the keys up to
// its last query.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using ditto::kTile;

namespace {

constexpr int64_t kBlock = 32;  // queries (tokens) per task

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct Shape {
  int64_t b, t, hq, hkv, g, d, s;
};

// Scores of rows [0, m) (row = g * tn + i: query head g, token t0 + i) over keys [0, n), softmax-normalised in
// place over each row's visible keys, zero past them up to n32.
void softmax_rows(float* sc, int64_t m, int64_t tn, int64_t n, int64_t n32, int64_t first_visible_end) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = sc + r * n32;
    const int64_t c = std::min(n, first_visible_end + r % tn);  // keys [0, c) visible to this query
    ditto::softmax_row(row, c, 1.0f);
    std::fill(row + c, row + n32, 0.0f);
  }
}

// The query blocks first, first + step, ... (< blocks) of row b, kv head h. The keys and values the last of them
// sees are packed once (keys transposed into tiles [n32 / 32][D][32], values into [d32 / 32][n32][32], zero
// padded); each block reads the prefix of them it sees.
void attend_blocks(const float* q, const float* k, const float* v, float* o, const Shape& sh, int64_t b, int64_t h,
                   int64_t first, int64_t step, int64_t blocks, int64_t offset, float scale, std::vector<float>& buf) {
  const int64_t last = first + (blocks - 1 - first) / step * step;
  const int64_t n_all = std::min(sh.s, offset + std::min(sh.t, (last + 1) * kBlock));  // keys the last query sees
  const int64_t n32_all = round_up(std::max<int64_t>(n_all, 1), kTile), d32 = round_up(sh.d, kTile);
  const int64_t m_max = sh.g * kBlock;
  buf.resize(n32_all * sh.d + d32 * n32_all + m_max * sh.d + m_max * n32_all + m_max * d32);
  float *kt = buf.data(), *vt = kt + n32_all * sh.d, *qs = vt + d32 * n32_all, *sc = qs + m_max * sh.d,
        *os = sc + m_max * n32_all;
  const int64_t row_stride = sh.hkv * sh.d;  // between positions of one (row, head) in the cache
  const float* kb = k + b * sh.s * row_stride + h * sh.d;
  const float* vb = v + b * sh.s * row_stride + h * sh.d;
  std::fill(kt, kt + n32_all * sh.d + d32 * n32_all, 0.0f);
  for (int64_t s = 0; s < n_all; ++s) {
    const float *ks = kb + s * row_stride, *vs = vb + s * row_stride;
    float* kt_s = kt + (s / kTile) * sh.d * kTile + s % kTile;
    for (int64_t d = 0; d < sh.d; ++d) kt_s[d * kTile] = ks[d];
    for (int64_t d = 0; d < sh.d; ++d) vt[(d / kTile) * n32_all * kTile + s * kTile + d % kTile] = vs[d];
  }
  for (int64_t blk = first; blk < blocks; blk += step) {
    const int64_t t0 = blk * kBlock, tn = std::min(kBlock, sh.t - t0), m = sh.g * tn;
    const int64_t n = std::min(sh.s, offset + t0 + tn);  // keys the block's last query sees
    if (n <= 0) {
      for (int64_t g = 0; g < sh.g; ++g)
        for (int64_t i = 0; i < tn; ++i)
          std::memset(o + ((b * sh.t + t0 + i) * sh.hq + h * sh.g + g) * sh.d, 0, sizeof(float) * sh.d);
      continue;
    }
    const int64_t n32 = round_up(n, kTile);
    for (int64_t g = 0; g < sh.g; ++g)
      for (int64_t i = 0; i < tn; ++i) {
        const float* qr = q + ((b * sh.t + t0 + i) * sh.hq + h * sh.g + g) * sh.d;
        float* dst = qs + (g * tn + i) * sh.d;
        for (int64_t d = 0; d < sh.d; ++d) dst[d] = qr[d] * scale;
      }
    for (int64_t j = 0; j < n32 / kTile; ++j)
      ditto::rows_against_tile(qs, sh.d, m, ditto::F32{kt + j * sh.d * kTile}, sh.d, sc + j * kTile, n32);
    softmax_rows(sc, m, tn, n, n32, offset + t0 + 1);
    for (int64_t j = 0; j < d32 / kTile; ++j)
      ditto::rows_against_tile(sc, n32, m, ditto::F32{vt + j * n32_all * kTile}, n32, os + j * kTile, d32);
    for (int64_t g = 0; g < sh.g; ++g)
      for (int64_t i = 0; i < tn; ++i)
        std::memcpy(o + ((b * sh.t + t0 + i) * sh.hq + h * sh.g + g) * sh.d, os + (g * tn + i) * d32,
                    sizeof(float) * sh.d);
  }
}

ffi::Error ChunkAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> q_offset,
                              ffi::ResultBuffer<ffi::F32> o, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || layer.element_count() != 1 ||
      q_offset.element_count() != (qd.size() == 4 ? qd[0] : -1) || o->element_count() != q.element_count())
    return ffi::Error::InvalidArgument("chunk_attention: want q [B,T,Hq,D], k and v [L,B,S,Hkv,D], layer [], "
                                       "q_offset [B]");
  const Shape sh{qd[0], qd[1], qd[2], kd[3], kd[3] > 0 ? qd[2] / kd[3] : 0, qd[3], kd[2]};
  for (int i = 0; i < 5; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("chunk_attention: k and v shapes differ");
  if (kd[1] != sh.b || kd[4] != sh.d || sh.hkv <= 0 || sh.hq % sh.hkv != 0)
    return ffi::Error::InvalidArgument("chunk_attention: shapes disagree (q [B,T,Hq,D], k [L,B,S,Hkv,D], Hq a "
                                       "multiple of Hkv)");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("chunk_attention: layer out of range");
  const int64_t per_layer = sh.b * sh.s * sh.hkv * sh.d;
  const float *qp = q.typed_data(), *kp = k.typed_data() + l * per_layer, *vp = v.typed_data() + l * per_layer;
  const int32_t* off = q_offset.typed_data();
  float* op = o->typed_data();
  // A task: one (row, kv head) and every `split`-th of its query blocks, split the fewest that still gives each
  // thread two tasks (packing the keys once a task; interleaved blocks keep the causal work even).
  const int64_t blocks = (sh.t + kBlock - 1) / kBlock, pairs = sh.b * sh.hkv;
  const int64_t split = std::min(blocks, std::max<int64_t>(1, (2 * ditto::thread_count() + pairs - 1) / pairs));
  ditto::parallel_for(pairs * split, 1, [&](int64_t task) {
    thread_local std::vector<float> buf;
    const int64_t j = task % split, h = (task / split) % sh.hkv, b = task / (split * sh.hkv);
    attend_blocks(qp, kp, vp, op, sh, b, h, j, split, blocks, std::max<int64_t>(off[b], 0), scale, buf);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoChunkAttention, ChunkAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_offset
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
