// The next token of every row (the decode step's sampler; kernels/cpu.py), the algorithm of
// ditto_jax/sampling/logits.py:select_tokens with its random numbers, one row per task:
//   scores = logits, a present token's divided by its row's repetition penalty (multiplied where negative), -inf
//   where the row's constraint state (cstate >= 0) allows no transition on the token's class;
//   logprob = logits[tok] - logsumexp(logits);
//   temperature <= 0: tok = the first index of max(scores);
//   else e_i = exp(s_i - max s) where s_i = scores_i / temperature >= kth (else 0), and tok is drawn from e's
//   top-p nucleus by pivot rejection: round r draws j from {e > pivot} by a two-level inverse CDF (block sums,
//   then one block) with u[r]; j is accepted when the mass strictly above e_j is < top_p * sum(e), else
//   pivot = e_j. The last round (r = R - 1) draws from e >= tau, tau the exact threshold found by a sort.
//
// XLA runs this as ~30 small fusions over [B, V] per step, each a pass on one thread (SmolLM2's 49k vocabulary, 8
// rows: ~1.5 ms a step); here each row is two passes plus one per rejected round, on every thread. One pass per
// round: the pass that sums the mass above e_j also sums each block's mass above it, the next round's block sums.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using ditto::hsum;
using ditto::row_max;
using ditto::kLanes;
using ditto::vn;

namespace {

// The block width of the two-level inverse CDF (logits.py:block_size): a power of two dividing the vocabulary.
int64_t block_size(int64_t vocab) {
  for (int64_t bs : {256, 512, 128, 64})
    if (vocab % bs == 0) return bs;
  return 256;
}

// log(sum(exp(x))) over a row.
float logsumexp(const float* x, int64_t n) {
  const float m = row_max(x, n);
  if (!std::isfinite(m)) return m;
  const int64_t nv = n / kLanes * kLanes;
  vn acc{};
  for (int64_t i = 0; i < nv; i += kLanes) acc += ditto::exp_nonpositive(ditto::loadn(x + i) - m);
  float s = hsum(acc);
  for (int64_t i = nv; i < n; ++i) s += std::exp(x[i] - m);
  return m + std::log(s);
}

// The first index of the largest value (jnp.argmax; NaNs never win here).
int32_t first_argmax(const float* x, int64_t n) {
  const float m = row_max(x, n);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == m) return static_cast<int32_t>(i);
  return 0;
}

// sums[b] = sum of e[i] > above over block b (blocks of bs; e holds nb * bs values, zeros past the vocabulary);
// returns their total.
float block_sums_above(const float* e, int64_t nb, int64_t bs, float above, float* sums) {
  const vn a = vn{} + above, zero{};
  float total = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    vn acc{};
    for (int64_t i = b * bs; i < (b + 1) * bs; i += kLanes) {
      const vn v = ditto::loadn(e + i);
      acc += ditto::select(ditto::greater(v, a), v, zero);
    }
    total += sums[b] = hsum(acc);
  }
  return total;
}

// The index i with cumsum(w)[i - 1] <= u * sum(w) < cumsum(w)[i], w = e where e > pivot, never a zero weight
// (logits.py:inverse_cdf, in the same two levels): the block from the block sums, then the index inside it.
int64_t inverse_cdf(const float* e, const float* sums, int64_t nb, int64_t bs, float pivot, float u,
                    std::vector<float>& cb) {
  cb.resize(nb);
  float run = 0.0f;
  for (int64_t b = 0; b < nb; ++b) cb[b] = run += sums[b];
  const float target = u * cb[nb - 1];
  int64_t bi = std::upper_bound(cb.begin(), cb.end(), target) - cb.begin();
  if (bi >= nb) bi = nb - 1;
  if (!(cb[bi] > target)) {  // rounding put the target at the total: the last block holding mass
    for (bi = nb - 1; bi > 0 && !(sums[bi] > 0.0f); --bi) {}
  }
  float cw = bi > 0 ? cb[bi - 1] : 0.0f;
  const float* blk = e + bi * bs;
  int64_t last_positive = 0;
  for (int64_t t = 0; t < bs; ++t) {
    const float w = blk[t] > pivot ? blk[t] : 0.0f;
    if (w > 0.0f) last_positive = t;
    cw += w;
    if (cw > target && w > 0.0f) return bi * bs + t;
  }
  return bi * bs + last_positive;
}

// The exact nucleus threshold tau (keep e >= tau) by sorting: the fallback of the last round.
float threshold_by_sort(const float* e, int64_t n, float limit, std::vector<float>& sorted) {
  sorted.assign(e, e + n);
  std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return a > b; });
  float before = 0.0f;
  int64_t count = 0;
  for (int64_t i = 0; i < n && before < limit; ++i, ++count) before += sorted[i];
  return sorted[std::max<int64_t>(count, 1) - 1];
}

struct Row {
  const float* scores;
  float temperature, kth, top_p;
  const float* u;  // [rounds]
};

// The constraint automata: the transition table and each constraint's token classes.
struct Constraint {
  const int32_t *next_state, *token_class;  // [S, C], [NC, V]
  int64_t states, classes, constraints;
};

// A row's scores: its logits with the repetition penalty on present tokens, then the constraint mask, written to
// `out`; the logits themselves where neither applies (no copy).
const float* row_scores(const float* logits, const bool* presence, float penalty, int32_t cstate, int32_t ccon,
                        const Constraint& c, int64_t vocab, float* out) {
  const bool penalise = penalty != 1.0f;
  if (!penalise && cstate < 0) return logits;
  for (int64_t i = 0; i < vocab; ++i) {
    const float l = logits[i];
    out[i] = penalise && presence[i] ? (l < 0.0f ? l * penalty : l / penalty) : l;
  }
  if (cstate < 0) return out;
  // indices clamped into range, as XLA's gathers do
  const int64_t st = std::min<int64_t>(cstate, c.states - 1), con = std::clamp<int64_t>(ccon, 0, c.constraints - 1);
  const int32_t *cls = c.token_class + con * vocab, *next = c.next_state + st * c.classes;
  for (int64_t i = 0; i < vocab; ++i)
    if (next[std::clamp<int64_t>(cls[i], 0, c.classes - 1)] < 0) out[i] = -INFINITY;
  return out;
}

int32_t sample_row(const Row& row, int64_t vocab, int64_t rounds, std::vector<float>& e, std::vector<float>& sums,
                   std::vector<float>& scratch) {
  const int64_t bs = block_size(vocab), nb = (vocab + bs - 1) / bs, nv = vocab / kLanes * kLanes;
  e.resize(nb * bs);
  std::fill(e.begin() + vocab, e.end(), 0.0f);
  sums.resize(nb);
  // s / t keeps the order of s, so max(s / t) is max(s) / t exactly.
  const float t = row.temperature, m = row_max(row.scores, vocab) / t, kth = row.kth;
  const vn vt = vn{} + t, vm = vn{} + m, vk = vn{} + kth, low = vn{} - 87.0f, zero{};
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vn s = ditto::loadn(row.scores + i) / vt;
    const vn x = s - vm;
    const vn ex = ditto::exp_nonpositive(x);
    const ditto::vin keep = ditto::greater_eq(s, vk) & ditto::greater_eq(x, low);
    ditto::storen(e.data() + i, ditto::select(keep, ex, zero));
  }
  for (int64_t i = nv; i < vocab; ++i) {
    const float s = row.scores[i] / t;
    e[i] = s >= kth && s - m >= -87.0f ? std::exp(s - m) : 0.0f;
  }
  const float z = block_sums_above(e.data(), nb, bs, -1.0f, sums.data());
  if (!(z > 0.0f) || !std::isfinite(z)) return first_argmax(row.scores, vocab);
  const float limit = row.top_p * z;
  const bool no_filter = row.top_p >= 1.0f;
  float pivot = -1.0f;
  for (int64_t r = 0; r < rounds; ++r) {
    const bool last = r == rounds - 1;
    if (last) {
      pivot = std::nextafter(threshold_by_sort(e.data(), vocab, limit, scratch), -1.0f);
      block_sums_above(e.data(), nb, bs, pivot, sums.data());
    }
    const int64_t j = inverse_cdf(e.data(), sums.data(), nb, bs, pivot, row.u[r], scratch);
    if (no_filter || last) return static_cast<int32_t>(j);
    const float ej = e[j];
    if (block_sums_above(e.data(), nb, bs, ej, sums.data()) < limit) return static_cast<int32_t>(j);
    pivot = ej;  // the sums just computed are those of e > pivot
  }
  return 0;  // not reached: the last round always returns
}

ffi::Error SelectTokensImpl(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::PRED> presence,
                            ffi::Buffer<ffi::F32> penalty, ffi::Buffer<ffi::S32> cstate, ffi::Buffer<ffi::S32> ccon,
                            ffi::Buffer<ffi::S32> next_state, ffi::Buffer<ffi::S32> token_class,
                            ffi::Buffer<ffi::F32> temperature, ffi::Buffer<ffi::F32> kth,
                            ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::F32> u,
                            ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logprobs) {
  const auto ld = logits.dimensions(), pd = presence.dimensions(), ud = u.dimensions();
  const auto nd = next_state.dimensions(), cd = token_class.dimensions();
  if (ld.size() != 2 || pd.size() != 2 || pd[0] != ld[0] || pd[1] != ld[1] || ud.size() != 2 || ud[0] != ld[0] ||
      ud[1] < 1 || nd.size() != 2 || nd[0] < 1 || nd[1] < 1 || cd.size() != 2 || cd[0] < 1 || cd[1] != ld[1])
    return ffi::Error::InvalidArgument("select_tokens: want logits and presence [B, V], next_state [S, C], "
                                       "token_class [NC, V], u [B, R >= 1]");
  const int64_t b_len = ld[0], vocab = ld[1], rounds = ud[1];
  for (const int64_t n : {penalty.element_count(), cstate.element_count(), ccon.element_count(),
                          temperature.element_count(), kth.element_count(), top_p.element_count(),
                          tokens->element_count(), logprobs->element_count()})
    if (n != b_len) return ffi::Error::InvalidArgument("select_tokens: every per-row operand and result is [B]");
  const Constraint con{next_state.typed_data(), token_class.typed_data(), nd[0], nd[1], cd[0]};
  const float *lp = logits.typed_data(), *tp = temperature.typed_data(), *kp = kth.typed_data(),
              *pp = top_p.typed_data(), *up = u.typed_data(), *pen = penalty.typed_data();
  const bool* pres = presence.typed_data();
  const int32_t *cs = cstate.typed_data(), *cc = ccon.typed_data();
  int32_t* tok = tokens->typed_data();
  float* out_lp = logprobs->typed_data();
  ditto::parallel_for(b_len, 1, [&](int64_t b) {
    thread_local std::vector<float> scores, e, sums, scratch;
    const float* row_logits = lp + b * vocab;
    scores.resize(vocab);
    const Row row{row_scores(row_logits, pres + b * vocab, pen[b], cs[b], cc[b], con, vocab, scores.data()), tp[b],
                  kp[b], pp[b], up + b * rounds};
    const int32_t j = row.temperature > 0.0f ? sample_row(row, vocab, rounds, e, sums, scratch)
                                             : first_argmax(row.scores, vocab);
    tok[b] = j;
    out_lp[b] = row_logits[j] - logsumexp(row_logits, vocab);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoSelectTokens, SelectTokensImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // presence
                                  .Arg<ffi::Buffer<ffi::F32>>()   // penalty
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cstate
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ccon
                                  .Arg<ffi::Buffer<ffi::S32>>()   // next_state
                                  .Arg<ffi::Buffer<ffi::S32>>()   // token_class
                                  .Arg<ffi::Buffer<ffi::F32>>()   // temperature
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kth
                                  .Arg<ffi::Buffer<ffi::F32>>()   // top_p
                                  .Arg<ffi::Buffer<ffi::F32>>()   // u
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
