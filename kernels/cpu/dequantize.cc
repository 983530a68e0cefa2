// GGUF blocks (Q4_0, Q4_1, Q8_0; 32 values a block) to float32, for loading a GGUF file: the values gguf's NumPy
// dequantisation gives, bit for bit (q * d is exact in float32, so the one rounding, of + m, is the same with or
// without a fused multiply-add), on the kernels' threads (~10x gguf's NumPy on SmolLM2's 135M weights).
#include "common.h"

namespace {

// IEEE half to float, exactly (subnormals, infinities and NaNs included); no F16C needed.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {
    const float f = static_cast<float>(man) * (1.0f / 16777216.0f);  // man * 2^-24, exact
    return sign ? -f : f;
  }
  const uint32_t bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return half_to_float(h);
}

struct Job {
  int kind;
  const uint8_t* blocks;
  float* out;
};

constexpr int64_t kBlocksPerTask = 256;
constexpr int64_t kBlockBytes[] = {18, 20, 34};  // Q4_0, Q4_1, Q8_0

void dequantize_range(const Job& job, int64_t b0, int64_t b1) {
  const int64_t size = kBlockBytes[job.kind];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = job.blocks + b * size;
    float* y = job.out + b * 32;
    const float d = half_at(p);
    if (job.kind == 2) {
      for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(p[2 + j]));
    } else if (job.kind == 1) {
      const float m = half_at(p + 2);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>(p[4 + j] & 15) + m;
        y[j + 16] = d * static_cast<float>(p[4 + j] >> 4) + m;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>((p[2 + j] & 15) - 8);
        y[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
      }
    }
  }
}

}  // namespace

// kind: 0 Q4_0, 1 Q4_1, 2 Q8_0; out holds n_blocks * 32 floats. Returns 0, or -1 for an unknown kind.
extern "C" int ditto_dequantize_gguf(int kind, const uint8_t* blocks, int64_t n_blocks, float* out) {
  if (kind < 0 || kind > 2) return -1;
  const Job job{kind, blocks, out};
  const int64_t tasks = (n_blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  ditto::parallel_for(tasks, 1, [&job, n_blocks](int64_t t) {
    const int64_t b0 = t * kBlocksPerTask, b1 = b0 + kBlocksPerTask < n_blocks ? b0 + kBlocksPerTask : n_blocks;
    dequantize_range(job, b0, b1);
  });
  return 0;
}
