// One new token per row against a heads-first KV cache (the CPU decode step's attention; kernels/cpu.py):
//   o[b, h, g, :] = softmax_s(q[b, h, g, :] . k[b, h, :, s] * scale) v[b, h, s, :]
// over s in [max(0, pos[b] + 1 - window), pos[b] + 1) (window 0: from 0), q [B, Hkv, G, D] (the G query heads
// of kv head h), k [B, Hkv, D, S], v [B, Hkv, S, D], pos [B] int32. Rows with an empty range get zeros.
//
// XLA runs q.k as a batch of [G, D] x [D, S] products at ~11 GB/s here and reads the whole cache width; this
// reads each row's keys and values once, only up to the row's position, one (row, kv head) per task.
#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using ditto::v16;
using ditto::vi16;

namespace {

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp; below -87 it returns ~0).
inline v16 exp_nonpositive(v16 x) {
  x = x < -87.0f ? ditto::splat(-87.0f) : x;
  const v16 magic = ditto::splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = ditto::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * r * r + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// scores[g][s] = q[g] . k[:, start + s] for s < n, 32 positions at a time with the G rows in registers.
template <int G>
void scores_block(const float* q, const float* k, int64_t d_len, int64_t s_len, int64_t start, int64_t n,
                  float* sc) {
  constexpr int V = 2;  // vectors of 16 positions per block
  const int64_t nv = n / (16 * V) * (16 * V);
  for (int64_t s = 0; s < nv; s += 16 * V) {
    v16 acc[G][V];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) acc[g][j] = v16{};
    const float* kr = k + start + s;
    for (int64_t d = 0; d < d_len; ++d, kr += s_len) {
      // The next block's keys: d_len rows at a stride are too many streams for the hardware prefetchers.
      ditto::prefetch(kr + 16 * V);
      ditto::prefetch(kr + 16 * V + 16);
      v16 kv[V];
      for (int j = 0; j < V; ++j) kv[j] = ditto::load16(kr + 16 * j);
      for (int g = 0; g < G; ++g) {
        const float qv = q[g * d_len + d];
        for (int j = 0; j < V; ++j) acc[g][j] += qv * kv[j];
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) ditto::store16(sc + g * n + s + 16 * j, acc[g][j]);
  }
  for (int64_t s = nv; s < n; ++s)
    for (int g = 0; g < G; ++g) {
      float a = 0.0f;
      for (int64_t d = 0; d < d_len; ++d) a += q[g * d_len + d] * k[d * s_len + start + s];
      sc[g * n + s] = a;
    }
}

// o[g] = sum_s p[g][s] v[start + s], 32 features at a time with the G rows in registers.
template <int G>
void values_block(const float* p, const float* v, int64_t d_len, int64_t start, int64_t n, float* o) {
  constexpr int V = 2;  // vectors of 16 features per block
  const int64_t dv = d_len / (16 * V) * (16 * V);
  for (int64_t d = 0; d < dv; d += 16 * V) {
    v16 acc[G][V];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) acc[g][j] = v16{};
    const float* vr = v + start * d_len + d;
    for (int64_t s = 0; s < n; ++s, vr += d_len) {
      ditto::prefetch(vr + 8 * d_len);
      ditto::prefetch(vr + 8 * d_len + 16);
      v16 vv[V];
      for (int j = 0; j < V; ++j) vv[j] = ditto::load16(vr + 16 * j);
      for (int g = 0; g < G; ++g) {
        const float pv = p[g * n + s];
        for (int j = 0; j < V; ++j) acc[g][j] += pv * vv[j];
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) ditto::store16(o + g * d_len + d + 16 * j, acc[g][j]);
  }
  for (int64_t d = dv; d < d_len; ++d)
    for (int g = 0; g < G; ++g) {
      float a = 0.0f;
      for (int64_t s = 0; s < n; ++s) a += p[g * n + s] * v[(start + s) * d_len + d];
      o[g * d_len + d] = a;
    }
}

void softmax_rows(float* sc, int64_t g_len, int64_t n, float scale) {
  const int64_t nv = n / 16 * 16;
  for (int64_t g = 0; g < g_len; ++g) {
    float* row = sc + g * n;
    float m = -INFINITY;
    for (int64_t s = 0; s < n; ++s) m = row[s] > m ? row[s] : m;
    m *= scale;
    v16 tv{};
    for (int64_t s = 0; s < nv; s += 16) {
      const v16 e = exp_nonpositive(ditto::load16(row + s) * scale - m);
      ditto::store16(row + s, e);
      tv += e;
    }
    float total = 0.0f;
    for (int i = 0; i < 16; ++i) total += tv[i];
    for (int64_t s = nv; s < n; ++s) total += (row[s] = std::exp(row[s] * scale - m));
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < n; ++s) row[s] *= inv;
  }
}

template <int G>
void one_head(const float* q, const float* k, const float* v, float* o, int64_t d_len, int64_t s_len,
              int64_t start, int64_t end, float scale, std::vector<float>& buf) {
  const int64_t n = end - start;
  if (n <= 0) {
    std::memset(o, 0, sizeof(float) * G * d_len);
    return;
  }
  buf.resize(G * n);  // scores, then weights: [G, n]
  scores_block<G>(q, k, d_len, s_len, start, n, buf.data());
  softmax_rows(buf.data(), G, n, scale);
  values_block<G>(buf.data(), v, d_len, start, n, o);
}

// Query heads of a kv head in groups of at most 4 (the register blocks above).
void one_kv_head(const float* q, const float* k, const float* v, float* o, int64_t g_len, int64_t d_len,
                 int64_t s_len, int64_t start, int64_t end, float scale, std::vector<float>& buf) {
  for (int64_t g0 = 0; g0 < g_len; g0 += 4) {
    const float* qg = q + g0 * d_len;
    float* og = o + g0 * d_len;
    switch (g_len - g0 < 4 ? g_len - g0 : 4) {
      case 1: one_head<1>(qg, k, v, og, d_len, s_len, start, end, scale, buf); break;
      case 2: one_head<2>(qg, k, v, og, d_len, s_len, start, end, scale, buf); break;
      case 3: one_head<3>(qg, k, v, og, d_len, s_len, start, end, scale, buf); break;
      default: one_head<4>(qg, k, v, og, d_len, s_len, start, end, scale, buf); break;
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> o,
                               int64_t window, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = pos.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 1)
    return ffi::Error::InvalidArgument("decode_attention: want q [B,H,G,D], k [B,H,D,S], v [B,H,S,D], pos [B]");
  const int64_t b_len = qd[0], h_len = qd[1], g_len = qd[2], d_len = qd[3], s_len = vd[2];
  if (kd[0] != b_len || kd[1] != h_len || kd[2] != d_len || kd[3] != s_len || vd[0] != b_len || vd[1] != h_len ||
      vd[3] != d_len || pd[0] != b_len)
    return ffi::Error::InvalidArgument("decode_attention: shapes disagree (q [B,H,G,D], k [B,H,D,S], v [B,H,S,D])");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* pp = pos.typed_data();
  float* op = o->typed_data();
  ditto::parallel_for(b_len * h_len, 1, [=](int64_t i) {
    thread_local std::vector<float> buf;
    const int64_t b = i / h_len;
    const int64_t last = static_cast<int64_t>(pp[b]);
    const int64_t end = std::min<int64_t>(last + 1, s_len);
    const int64_t start = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
    one_kv_head(qp + i * g_len * d_len, kp + i * d_len * s_len, vp + i * s_len * d_len, op + i * g_len * d_len,
                g_len, d_len, s_len, start, end, scale, buf);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
