// c[M, N] = op(a) @ op(b) in float32 through OpenBLAS's sgemm (scipy-openblas32, loaded by kernels/cpu.py), for
// the large products of a training step and a prompt phase.
//
// XLA's CPU dots ran the 40M model's products at 185-265 GFLOP/s on a 2-core Xeon VM where OpenBLAS runs them at
// 275-320 (the tied head's [4096, 512] x [512, 32000]: 185-200 against 290), and XLA copies the activations
// transposed before every weight-gradient dot; sgemm reads either operand transposed in place. OpenBLAS runs
// single-threaded here: the kernels' own workers (common.h) split the rows of c, or its columns when it has more,
// so that its threads never spin beside XLA's between calls.
#include "common.h"

namespace ffi = xla::ffi;

namespace {

// c = op(a) @ op(b): a is [M, K] ([K, M] with trans_a), b [K, N] ([N, K] with trans_b), both read in place.
ffi::Error Gemm(const float* pa, int64_t a0, int64_t a1, const float* pb, int64_t b0, int64_t b1,
                ffi::ResultBuffer<ffi::F32>& c, bool trans_a, bool trans_b) {
  if (ditto::g_sgemm == nullptr) return ffi::Error::Internal("ditto_gemm: no sgemm was set (kernels/cpu.py loads OpenBLAS)");
  const auto cd = c->dimensions();
  if (cd.size() != 2) return ffi::Error::InvalidArgument("ditto_gemm: 2-D operands");
  const int64_t m = cd[0], n = cd[1], k = trans_a ? a0 : a1, lda = a1, ldb = b1;
  if ((trans_a ? a1 : a0) != m || (trans_b ? b1 : b0) != k || (trans_b ? b0 : b1) != n)
    return ffi::Error::InvalidArgument("ditto_gemm: operand shapes do not multiply to the output's");
  float* pc = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(pc, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  // Two parts a thread (16-row or 16-column multiples): a thread slowed by XLA's work takes fewer of them.
  const bool by_rows = m >= n;
  const int64_t total = by_rows ? m : n, parts = 2 * ditto::thread_count();
  const int64_t step = ((total + parts - 1) / parts + 15) / 16 * 16;
  ditto::parallel_for((total + step - 1) / step, 1, [&](int64_t i) {
    const int64_t lo = i * step, len = std::min(step, total - lo);
    if (by_rows) {
      ditto::sgemm(trans_a, trans_b, len, n, k, 1.0f, trans_a ? pa + lo : pa + lo * lda, lda, pb, ldb, 0.0f, pc + lo * n, n);
    } else {
      ditto::sgemm(trans_a, trans_b, m, len, k, 1.0f, pa, lda, trans_b ? pb + lo * ldb : pb + lo, ldb, 0.0f, pc + lo, n);
    }
  });
  return ffi::Error::Success();
}

ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, bool trans_a,
                    bool trans_b) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("ditto_gemm: 2-D operands");
  return Gemm(a.typed_data(), ad[0], ad[1], b.typed_data(), bd[0], bd[1], c, trans_a, trans_b);
}

// The same product with b one matrix of a stacked [L, ., .] array, `layer` (int32 scalar) picking it in place: a
// scanned layer loop's weights are not copied out of their stack (the prompt phases, on SmolLM2-135M ~0.4 GB a call).
ffi::Error GemmLayerImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> layer,
                         ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 3 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("ditto_gemm_layer: want a 2-D a, a stacked 3-D b and a scalar layer");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= bd[0]) return ffi::Error::InvalidArgument("ditto_gemm_layer: layer out of range");
  return Gemm(a.typed_data(), ad[0], ad[1], b.typed_data() + l * bd[1] * bd[2], bd[1], bd[2], c, trans_a, trans_b);
}

}  // namespace

// The width in bytes of the widest vectors, float and integer, this library was compiled for (-march=native): 64 with
// AVX-512, 32 with AVX2, else 16 (kernels/cpu.py keeps XLA's ops for decoding below 32: the kernels' 8-float
// vectors would not be native there, and no such host was measured).
extern "C" int ditto_vector_bytes() {
#if defined(__AVX512F__)
  return 64;
#elif defined(__AVX2__)
  return 32;
#else
  return 16;
#endif
}

// kernels/cpu.py passes OpenBLAS's cblas_sgemm (the library set to one thread) before registering the handler.
extern "C" void ditto_set_sgemm(void* fn) { ditto::g_sgemm = reinterpret_cast<ditto::Sgemm>(fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DittoGemmLayer, GemmLayerImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
