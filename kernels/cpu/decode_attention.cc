// One new token per row against a heads-first KV cache (the CPU decode step's attention; kernels/cpu.py):
//   o[b, h, g, :] = softmax_s(q[b, h, g, :] . k[b, h, :, s] * scale) v[b, h, s, :]
// over s in [max(0, pos[b] + 1 - window), pos[b] + 1) (window 0: from 0), q [B, Hkv, G, D] (the G query heads
// of kv head h), k [B, Hkv, D, S], v [B, Hkv, S, D], pos [B] int32. Rows with an empty range get zeros.
//
// XLA runs q.k as a batch of [G, D] x [D, S] products at ~11 GB/s here and reads the whole cache width; this
// reads each row's keys and values once, only up to the row's position.
//
// Rows that share a prefix (lead [B], shared [B] int32: row b's positions [0, shared[b]) hold the same keys and
// values as row lead[b]'s, e.g. copied from one prefix-cache row) are one task per kv head: the shared positions
// are read from the lead row once for all of them (then from L2), each row's own positions from its own cache.
// Every score and every sum is computed in the same order as without sharing, so the outputs are bit-identical.
//
// DittoDecodeAttentionUpdate first writes each row's new key and value (k_new, v_new [B, Hkv, D]) at its position
// into the caches, which XLA aliases to its outputs: in place, where XLA's scatter of one key per row into the
// [B, Hkv, D, S] keys is strided and slow (0.45 ms of a 15 ms step, 40M model, 16 rows).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using ditto::kLanes;
using ditto::vn;

namespace {

// Positions (scores) or features (values) per register block: V of the host's vectors, so G <= 4 rows of V
// accumulators and V operands fit its registers (32 positions with AVX-512, 16 with AVX2). Every score and output
// is one chain of fused multiply-adds in the order of d or s, whatever the block width.
constexpr int V = 2;
constexpr int64_t kBlock = kLanes * V;

// sc[g * ld + s] = q[g] . k[:, start + s] for s < n, kBlock positions at a time with the G rows in registers.
template <int G>
void scores_block(const float* q, const float* k, int64_t d_len, int64_t s_len, int64_t start, int64_t n,
                  float* sc, int64_t ld) {
  const int64_t nv = n / kBlock * kBlock;
  for (int64_t s = 0; s < nv; s += kBlock) {
    vn acc[G][V];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) acc[g][j] = vn{};
    const float* kr = k + start + s;
    for (int64_t d = 0; d < d_len; ++d, kr += s_len) {
      // The next block's keys: d_len rows at a stride are too many streams for the hardware prefetchers.
      for (int64_t b = 0; b < kBlock; b += 16) ditto::prefetch(kr + kBlock + b);
      vn kv[V];
      for (int j = 0; j < V; ++j) kv[j] = ditto::loadn(kr + kLanes * j);
      for (int g = 0; g < G; ++g) {
        const float qv = q[g * d_len + d];
        for (int j = 0; j < V; ++j) acc[g][j] += qv * kv[j];
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) ditto::storen(sc + g * ld + s + kLanes * j, acc[g][j]);
  }
  // The tail: fused multiply-adds like the vector loop's, so a position's score never depends on whether it
  // fell in a block or in the tail (with sharing the blocks start at another position).
  for (int64_t s = nv; s < n; ++s)
    for (int g = 0; g < G; ++g) {
      float a = 0.0f;
      for (int64_t d = 0; d < d_len; ++d) a = std::fma(q[g * d_len + d], k[d * s_len + start + s], a);
      sc[g * ld + s] = a;
    }
}

// o[g] = sum_s p[g * ld + s] v[start + s] for s < n, kBlock features at a time with the G rows in registers;
// positions below `split` are read from v_first (a lead row's cache), the rest from v, in one running sum.
template <int G>
void values_block(const float* p, int64_t ld, const float* v_first, int64_t split, const float* v, int64_t d_len,
                  int64_t start, int64_t n, float* o) {
  const int64_t dv = d_len / kBlock * kBlock;
  const int64_t mid = std::min(std::max<int64_t>(split - start, 0), n);  // positions [0, mid) from v_first
  auto row_of = [&](int64_t s) { return (s < mid ? v_first : v) + (start + s) * d_len; };
  for (int64_t d = 0; d < dv; d += kBlock) {
    vn acc[G][V];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) acc[g][j] = vn{};
    for (int64_t s0 = 0, s1 = mid; s0 < n; s0 = s1, s1 = n) {
      const float* vr = row_of(s0) + d;
      for (int64_t s = s0; s < s1; ++s, vr += d_len) {
        for (int64_t b = 0; b < kBlock; b += 16) ditto::prefetch(vr + 8 * d_len + b);
        vn vv[V];
        for (int j = 0; j < V; ++j) vv[j] = ditto::loadn(vr + kLanes * j);
        for (int g = 0; g < G; ++g) {
          const float pv = p[g * ld + s];
          for (int j = 0; j < V; ++j) acc[g][j] += pv * vv[j];
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < V; ++j) ditto::storen(o + g * d_len + d + kLanes * j, acc[g][j]);
  }
  for (int64_t d = dv; d < d_len; ++d)
    for (int g = 0; g < G; ++g) {
      float a = 0.0f;
      for (int64_t s = 0; s < n; ++s) a = std::fma(p[g * ld + s], row_of(s)[d], a);
      o[g * d_len + d] = a;
    }
}

void softmax_rows(float* sc, int64_t g_len, int64_t n, float scale) {
  for (int64_t g = 0; g < g_len; ++g) ditto::softmax_row(sc + g * n, n, scale);
}

// One row's view of one kv head: its queries [G, D], its keys [D, S] and values [S, D], the lead row's (for
// positions below `shared`), its attended range and its output [G, D].
struct RowHead {
  const float *q, *k, *v, *k_lead, *v_lead;
  float* o;
  int64_t start, end, shared;
};

// Query heads in groups of at most 4 (the register blocks above).
template <typename Fn>
void by_query_groups(int64_t g_len, const Fn& fn) {
  for (int64_t g0 = 0; g0 < g_len; g0 += 4) fn(g0, g_len - g0 < 4 ? g_len - g0 : 4);
}

// The rows of one group (a lead and the rows sharing its prefix; or one row alone) against one kv head: every
// row's scores over the shared positions first (the lead's keys read from memory once, then from cache), then
// each row's own positions, the softmax, and the values the same way.
void group_kv_head(const std::vector<RowHead>& rows, int64_t g_len, int64_t d_len, int64_t s_len, float scale,
                   std::vector<float>& buf) {
  thread_local std::vector<int64_t> offset;  // each row's scores in buf (no allocation per call once grown)
  offset.assign(rows.size() + 1, 0);
  for (size_t i = 0; i < rows.size(); ++i)
    offset[i + 1] = offset[i] + g_len * std::max<int64_t>(rows[i].end - rows[i].start, 0);
  buf.resize(offset.back());
  for (int pass = 0; pass < 2; ++pass)  // 0: the lead's positions, 1: each row's own
    for (size_t i = 0; i < rows.size(); ++i) {
      const RowHead& r = rows[i];
      const int64_t n = r.end - r.start;
      if (n <= 0) continue;
      const int64_t from_lead = std::min(std::max<int64_t>(r.shared - r.start, 0), n);
      // pass 0: positions [start, start + from_lead) from the lead's keys; pass 1: the rest from the row's own
      const int64_t skip = pass == 0 ? 0 : from_lead, count = pass == 0 ? from_lead : n - from_lead;
      if (count <= 0) continue;
      const float* keys = pass == 0 ? r.k_lead : r.k;
      by_query_groups(g_len, [&](int64_t g0, int64_t gn) {
        float* at = buf.data() + offset[i] + g0 * n + skip;
        const float* q = r.q + g0 * d_len;
        const int64_t first = r.start + skip;
        switch (gn) {
          case 1: scores_block<1>(q, keys, d_len, s_len, first, count, at, n); break;
          case 2: scores_block<2>(q, keys, d_len, s_len, first, count, at, n); break;
          case 3: scores_block<3>(q, keys, d_len, s_len, first, count, at, n); break;
          default: scores_block<4>(q, keys, d_len, s_len, first, count, at, n); break;
        }
      });
    }
  for (size_t i = 0; i < rows.size(); ++i) {
    const RowHead& r = rows[i];
    const int64_t n = r.end - r.start;
    if (n <= 0) {
      std::memset(r.o, 0, sizeof(float) * g_len * d_len);
      continue;
    }
    softmax_rows(buf.data() + offset[i], g_len, n, scale);
    by_query_groups(g_len, [&](int64_t g0, int64_t gn) {
      const float* p = buf.data() + offset[i] + g0 * n;
      float* o = r.o + g0 * d_len;
      switch (gn) {
        case 1: values_block<1>(p, n, r.v_lead, r.shared, r.v, d_len, r.start, n, o); break;
        case 2: values_block<2>(p, n, r.v_lead, r.shared, r.v, d_len, r.start, n, o); break;
        case 3: values_block<3>(p, n, r.v_lead, r.shared, r.v, d_len, r.start, n, o); break;
        default: values_block<4>(p, n, r.v_lead, r.shared, r.v, d_len, r.start, n, o); break;
      }
    });
  }
}

// kv_new (nullptr: none) = {k_new, v_new, k_out, v_out}: each row's new key and value ([B, H, D] each) are first
// written at its position into the caches k_out and v_out, which XLA aliases to k and v.
struct NewKV {
  const float *k_new, *v_new;
  float *k_out, *v_out;
};

ffi::Error Attend(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lead, ffi::Buffer<ffi::S32> shared,
                  ffi::ResultBuffer<ffi::F32> o, int64_t window, float scale, const NewKV* kv_new) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = pos.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 1 || lead.dimensions().size() != 1 ||
      shared.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "decode_attention: want q [B,H,G,D], k [B,H,D,S], v [B,H,S,D], pos, lead, shared [B]");
  const int64_t b_len = qd[0], h_len = qd[1], g_len = qd[2], d_len = qd[3], s_len = vd[2];
  if (kd[0] != b_len || kd[1] != h_len || kd[2] != d_len || kd[3] != s_len || vd[0] != b_len || vd[1] != h_len ||
      vd[3] != d_len || pd[0] != b_len || lead.dimensions()[0] != b_len || shared.dimensions()[0] != b_len)
    return ffi::Error::InvalidArgument("decode_attention: shapes disagree (q [B,H,G,D], k [B,H,D,S], v [B,H,S,D])");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *pp = pos.typed_data(), *lp = lead.typed_data(), *sp = shared.typed_data();
  float* op = o->typed_data();
  // Groups: each row joins its lead's (a lead out of range, or a window, leaves it alone); shared positions are
  // never more than the row's own range.
  std::vector<std::vector<int64_t>> groups;
  std::vector<int64_t> group_of(b_len, -1);
  for (int64_t b = 0; b < b_len; ++b) {
    const int64_t l = lp[b];
    const bool joins = window == 0 && l >= 0 && l < b && lp[l] == l && sp[b] > 0 && group_of[l] >= 0;
    if (joins) {
      groups[group_of[l]].push_back(b);
    } else {
      group_of[b] = static_cast<int64_t>(groups.size());
      groups.push_back({b});
    }
  }
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  ditto::parallel_for(n_groups * h_len, 1, [&](int64_t t) {
    thread_local std::vector<float> buf;
    thread_local std::vector<RowHead> rows;
    const std::vector<int64_t>& members = groups[t / h_len];
    const int64_t h = t % h_len, l = members[0];
    if (kv_new != nullptr)  // the group's rows read only their own and their lead's caches: written here first
      for (int64_t b : members) {
        const int64_t at = pp[b], i = b * h_len + h;
        if (at < 0 || at >= s_len) continue;  // dropped, as XLA's scatter drops an index out of range
        const float *kn = kv_new->k_new + i * d_len, *vn = kv_new->v_new + i * d_len;
        float* kc = kv_new->k_out + i * d_len * s_len + at;
        for (int64_t d = 0; d < d_len; ++d) kc[d * s_len] = kn[d];
        std::memcpy(kv_new->v_out + (i * s_len + at) * d_len, vn, sizeof(float) * d_len);
      }
    rows.clear();
    for (int64_t b : members) {
      const int64_t i = b * h_len + h, il = l * h_len + h;
      const int64_t last = static_cast<int64_t>(pp[b]);
      const int64_t end = std::min<int64_t>(last + 1, s_len);
      const int64_t start = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
      const int64_t lead_end = std::min<int64_t>(static_cast<int64_t>(pp[l]) + 1, s_len);
      const int64_t share = b == l ? 0 : std::min<int64_t>({static_cast<int64_t>(sp[b]), end, lead_end});
      rows.push_back(RowHead{qp + i * g_len * d_len, kp + i * d_len * s_len, vp + i * s_len * d_len,
                             kp + il * d_len * s_len, vp + il * s_len * d_len, op + i * g_len * d_len, start, end,
                             share});
    }
    group_kv_head(rows, g_len, d_len, s_len, scale, buf);
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lead, ffi::Buffer<ffi::S32> shared,
                               ffi::ResultBuffer<ffi::F32> o, int64_t window, float scale) {
  return Attend(q, k, v, pos, lead, shared, o, window, scale, nullptr);
}

ffi::Error DecodeAttentionUpdateImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                     ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lead,
                                     ffi::Buffer<ffi::S32> shared, ffi::Buffer<ffi::F32> k_new,
                                     ffi::Buffer<ffi::F32> v_new, ffi::ResultBuffer<ffi::F32> o,
                                     ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out,
                                     int64_t window, float scale) {
  const auto qd = q.dimensions();
  const int64_t want = qd.size() == 4 ? qd[0] * qd[1] * qd[3] : -1;
  if (k_new.element_count() != want || v_new.element_count() != want ||
      k_out->element_count() != k.element_count() || v_out->element_count() != v.element_count() ||
      k_out->typed_data() != k.typed_data() || v_out->typed_data() != v.typed_data())
    return ffi::Error::InvalidArgument("decode_attention (with new keys and values): want k_new and v_new [B,H,D] "
                                       "and the caches aliased to the outputs");
  const NewKV kv{k_new.typed_data(), v_new.typed_data(), k_out->typed_data(), v_out->typed_data()};
  return Attend(q, k, v, pos, lead, shared, o, window, scale, &kv);
}

// The operands both handlers share: q, k, v (float32), pos, lead, shared (int32).
auto AttentionOperands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoDecodeAttentionUpdate, DecodeAttentionUpdateImpl,
                              AttentionOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v (aliased)
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoDecodeAttention, DecodeAttentionImpl,
                              AttentionOperands()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
