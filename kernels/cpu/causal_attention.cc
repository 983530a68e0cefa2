// Causal self-attention over whole (packed) rows for training, forward and backward: q [B, S, Hq, D], k/v
// [B, S, Hkv, D], segment ids [B, S]; query i sees key j <= i of its own segment (the reference's mask, padding's
// segment 0 included). The products run OpenBLAS's sgemm (common.h) on blocks of kBlock query rows against the
// keys they can see, the operands read in place at their strides; the masked softmax and its gradient in between
// are vector loops. The forward keeps each row's log-sum-exp for the backward, which recomputes the probabilities.
//
// XLA's blocked attention (ditto_jax.model.xla_attention) ran the 40M model's layer, B8 S512, forward and backward,
// in 124-133 ms on a 2-core Xeon VM, its score products at 30-45 GFLOP/s.
#include "common.h"

namespace ffi = xla::ffi;
using ditto::kLanes;
using ditto::vin;
using ditto::vn;

namespace {

constexpr int64_t kBlock = 64;  // query rows a block

// The operands' shapes and the strides derived from them (q/o rows ldq apart, k/v rows ldk apart).
struct Dims {
  int64_t b, s, hq, hkv, d, group, ldq, ldk, s_pad;
};

// The keys row `pos` (segment `seg_r`) may see among lanes [j, j + kLanes): j <= pos and seg[j] == seg_r.
inline vin visible(const int32_t* seg, int64_t j, int64_t pos, int32_t seg_r) {
  vin sj;
  std::memcpy(&sj, seg + j, sizeof sj);
  const vin ids = ditto::iota() + static_cast<int32_t>(j);
  return ditto::equal(sj, vin{} + seg_r) & ditto::less_eq(ids, vin{} + static_cast<int32_t>(pos));
}

// row[j] <- exp(row[j] - sub) where visible, else 0, for j in [0, n); returns the sum. Rows are padded to 16 (the
// caller's buffers and segment copy are), so the last partial vector reads padding, which is never visible. The
// loops run on the host's own vector width (ditto::vn): they compare and select on every element.
inline float masked_exp(float* row, int64_t n, const int32_t* seg, int64_t pos, int32_t seg_r, float sub) {
  vn total{};
  for (int64_t j = 0; j < n; j += ditto::kLanes) {
    vn x = ditto::loadn(row + j) - sub;
    x = ditto::select(ditto::greater(x, vn{}), vn{}, x);
    const vn p = ditto::select(visible(seg, j, pos, seg_r), ditto::exp_nonpositive(x), vn{});
    ditto::storen(row + j, p);
    total += p;
  }
  return ditto::hsum(total);
}

inline float masked_max(const float* row, int64_t n, const int32_t* seg, int64_t pos, int32_t seg_r) {
  vn m = vn{} - 3.0e38f;
  for (int64_t j = 0; j < n; j += ditto::kLanes) {
    m = ditto::vmax(ditto::select(visible(seg, j, pos, seg_r), ditto::loadn(row + j), vn{} - 3.0e38f), m);
  }
  return ditto::hmax(m);
}

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// The row's segment ids padded to a multiple of 16 with -1 (no real segment), for the vector masks.
std::vector<int32_t> padded_segments(const int32_t* seg, int64_t s) {
  std::vector<int32_t> out(pad16(s) + 16, -1);
  std::memcpy(out.data(), seg, sizeof(int32_t) * s);
  return out;
}

// The dims of q [B, S, Hq, D], k [B, S, Hkv, D] and segment ids [B, S] into `d`, or why they do not fit.
ffi::Error Layout(const ffi::Span<const int64_t>& qd, const ffi::Span<const int64_t>& kd,
                  const ffi::Span<const int64_t>& sd, Dims& d) {
  if (qd.size() != 4 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] || kd[2] == 0 ||
      qd[2] % kd[2])
    return ffi::Error::InvalidArgument("ditto_causal_attention: q [B, S, Hq, D], k/v [B, S, Hkv, D], Hq % Hkv == 0");
  if (sd.size() != 2 || sd[0] != qd[0] || sd[1] != qd[1])
    return ffi::Error::InvalidArgument("ditto_causal_attention: segment ids [B, S]");
  if (ditto::g_sgemm == nullptr) return ffi::Error::Internal("ditto_causal_attention: no sgemm was set");
  d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], qd[2] / kd[2], qd[2] * qd[3], kd[2] * qd[3], pad16(qd[1])};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::S32> segments, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims d;
  if (auto e = Layout(q.dimensions(), k.dimensions(), segments.dimensions(), d); e.failure()) return e;
  const int64_t group = d.group, ldq = d.ldq, ldk = d.ldk, s_pad = d.s_pad;
  ditto::parallel_for(d.b * d.hq, 1, [&](int64_t task) {
    const int64_t b = task / d.hq, h = task % d.hq, hk = h / group;
    const float* qh = q.typed_data() + b * d.s * ldq + h * d.d;
    const float* kh = k.typed_data() + b * d.s * ldk + hk * d.d;
    const float* vh = v.typed_data() + b * d.s * ldk + hk * d.d;
    float* oh = out->typed_data() + b * d.s * ldq + h * d.d;
    float* lse_row = lse->typed_data() + (b * d.hq + h) * d.s;
    const std::vector<int32_t> seg = padded_segments(segments.typed_data() + b * d.s, d.s);
    std::vector<float> p(kBlock * s_pad);
    for (int64_t i0 = 0; i0 < d.s; i0 += kBlock) {
      const int64_t rows = std::min(kBlock, d.s - i0), keys = i0 + rows, ld = pad16(keys);
      ditto::sgemm(false, true, rows, keys, d.d, scale, qh + i0 * ldq, ldq, kh, ldk, 0.0f, p.data(), ld);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = p.data() + r * ld;
        const int64_t pos = i0 + r;
        const float m = masked_max(row, ld, seg.data(), pos, seg[pos]);
        const float total = masked_exp(row, ld, seg.data(), pos, seg[pos], m);
        const vn inv = vn{} + 1.0f / total;
        for (int64_t j = 0; j < ld; j += kLanes) ditto::storen(row + j, ditto::loadn(row + j) * inv);
        lse_row[pos] = m + std::log(total);
      }
      ditto::sgemm(false, false, rows, d.d, keys, 1.0f, p.data(), ld, vh, ldk, 0.0f, oh + i0 * ldq, ldq);
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::S32> segments, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims d;
  if (auto e = Layout(q.dimensions(), k.dimensions(), segments.dimensions(), d); e.failure()) return e;
  const int64_t group = d.group, ldq = d.ldq, ldk = d.ldk, s_pad = d.s_pad;
  // One task a (row, kv head): it owns that head's dk and dv and its query heads' dq, so nothing is shared.
  ditto::parallel_for(d.b * d.hkv, 1, [&](int64_t task) {
    const int64_t b = task / d.hkv, hk = task % d.hkv;
    const float* kh = k.typed_data() + b * d.s * ldk + hk * d.d;
    const float* vh = v.typed_data() + b * d.s * ldk + hk * d.d;
    float* dkh = dk->typed_data() + b * d.s * ldk + hk * d.d;
    float* dvh = dv->typed_data() + b * d.s * ldk + hk * d.d;
    for (int64_t j = 0; j < d.s; ++j) {
      std::memset(dkh + j * ldk, 0, sizeof(float) * d.d);
      std::memset(dvh + j * ldk, 0, sizeof(float) * d.d);
    }
    const std::vector<int32_t> seg = padded_segments(segments.typed_data() + b * d.s, d.s);
    std::vector<float> p(kBlock * s_pad), ds(kBlock * s_pad), delta(d.s);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t off = b * d.s * ldq + h * d.d;
      const float *qh = q.typed_data() + off, *oh = out.typed_data() + off, *doh = d_out.typed_data() + off;
      float* dqh = dq->typed_data() + off;
      const float* lse_row = lse.typed_data() + (b * d.hq + h) * d.s;
      for (int64_t i = 0; i < d.s; ++i) {  // delta_i = do_i . o_i
        float acc = 0.0f;
        for (int64_t c = 0; c < d.d; ++c) acc += doh[i * ldq + c] * oh[i * ldq + c];
        delta[i] = acc;
      }
      for (int64_t i0 = 0; i0 < d.s; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, d.s - i0), keys = i0 + rows, ld = pad16(keys);
        ditto::sgemm(false, true, rows, keys, d.d, scale, qh + i0 * ldq, ldq, kh, ldk, 0.0f, p.data(), ld);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = i0 + r;
          masked_exp(p.data() + r * ld, ld, seg.data(), pos, seg[pos], lse_row[pos]);
        }
        // dv += p^T do;  dp = do v^T;  ds = p * (dp - delta) * scale;  dq = ds k;  dk += ds^T q
        ditto::sgemm(true, false, keys, d.d, rows, 1.0f, p.data(), ld, doh + i0 * ldq, ldq, 1.0f, dvh, ldk);
        ditto::sgemm(false, true, rows, keys, d.d, 1.0f, doh + i0 * ldq, ldq, vh, ldk, 0.0f, ds.data(), ld);
        for (int64_t r = 0; r < rows; ++r) {
          float* dsr = ds.data() + r * ld;
          const float* pr = p.data() + r * ld;
          const vn dl = vn{} + delta[i0 + r], sc = vn{} + scale;
          for (int64_t j = 0; j < ld; j += kLanes)
            ditto::storen(dsr + j, ditto::loadn(pr + j) * (ditto::loadn(dsr + j) - dl) * sc);
        }
        ditto::sgemm(false, false, rows, d.d, keys, 1.0f, ds.data(), ld, kh, ldk, 0.0f, dqh + i0 * ldq, ldq);
        ditto::sgemm(true, false, keys, d.d, rows, 1.0f, ds.data(), ld, qh + i0 * ldq, ldq, 1.0f, dkh, ldk);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoCausalAttention, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoCausalAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
