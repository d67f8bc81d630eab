// y = x W^T + b for an N:M-sparse W stored as nmflow's compressed format stores it: the kept values
// [out, K] (K = in / M * N, ascending in-group position) and their in-group positions, `bits` bits each,
// packed least significant bit first into one uint8 stream over the whole tensor (row-major kept order).
//
// Two paths, both threaded over output rows with at::parallel_for and accumulating in fp32:
//   * few rows of x (decoding): per 16 kept weights, decode 16 positions, gather x at them, FMA;
//   * many rows: x transposed to [in, B], so each kept weight scales one contiguous run of x^T (FMA over batch).
// The AVX-512 versions (F, BW, VL, VBMI: a byte permute decodes 16 packed positions at once) are compiled when
// the compiler targets such a CPU (-march=native); the portable versions decode into small buffers and leave
// the inner loops to the compiler's vectoriser, and are also reachable with impl=1 so tests cover them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define NM_AVX512 1
#include <immintrin.h>
#endif

namespace {

struct Layout {
  int64_t out, in, n, m, k, bits, idx_bytes;
  const uint8_t* idx;
  const int32_t* base;  // base[j] = (j / n) * m: the first input column of kept entry j's group
};

constexpr int64_t kChunk = 256;  // kept weights decoded at a time by the portable paths

inline int32_t decode_one(const Layout& L, int64_t e) {
  const int64_t bit = e * L.bits, b = bit >> 3;
  uint32_t w = L.idx[b];
  if (b + 1 < L.idx_bytes) w |= uint32_t(L.idx[b + 1]) << 8;
  if (b + 2 < L.idx_bytes) w |= uint32_t(L.idx[b + 2]) << 16;
  return int32_t((w >> (bit & 7)) & ((1u << L.bits) - 1));
}

// Input columns and fp32 values of kept entries [j0, j0 + count) of row r.
template <typename T>
inline void decode_chunk(const Layout& L, const T* vals, int64_t r, int64_t j0, int64_t count, int32_t* cols,
                         float* v) {
  const int64_t e0 = r * L.k + j0;
  for (int64_t t = 0; t < count; ++t) {
    cols[t] = L.base[j0 + t] + decode_one(L, e0 + t);
    v[t] = static_cast<float>(vals[e0 + t]);
  }
}

// ---------------------------------------------------------------- portable
template <typename T>
void small_portable(const Layout& L, const T* vals, const float* x, int64_t B, float* y, const float* bias,
                    int64_t r0, int64_t r1) {
  int32_t cols[kChunk];
  float v[kChunk];
  std::vector<float> acc(B);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j0 = 0; j0 < L.k; j0 += kChunk) {
      const int64_t count = std::min(kChunk, L.k - j0);
      decode_chunk(L, vals, r, j0, count, cols, v);
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * L.in;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < count; ++t) s += v[t] * xb[cols[t]];
        acc[b] += s;
      }
    }
    for (int64_t b = 0; b < B; ++b) y[b * L.out + r] = acc[b] + (bias ? bias[r] : 0.f);
  }
}

constexpr int64_t kBatchBlock = 64;  // columns of x^T kept in cache while a thread's rows go by

template <typename T>
void large_portable(const Layout& L, const T* vals, const float* xt, int64_t B, float* yt, const float* bias,
                    int64_t r0, int64_t r1) {
  int32_t cols[kChunk];
  float v[kChunk];
  float acc[kBatchBlock];
  for (int64_t bb = 0; bb < B; bb += kBatchBlock) {
    const int64_t nb = std::min(kBatchBlock, B - bb);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc, acc + nb, bias ? bias[r] : 0.f);
      for (int64_t j0 = 0; j0 < L.k; j0 += kChunk) {
        const int64_t count = std::min(kChunk, L.k - j0);
        decode_chunk(L, vals, r, j0, count, cols, v);
        for (int64_t t = 0; t < count; ++t) {
          const float* xr = xt + cols[t] * B + bb;
          const float vt = v[t];
#pragma omp simd
          for (int64_t b = 0; b < nb; ++b) acc[b] += vt * xr[b];
        }
      }
      std::copy(acc, acc + nb, yt + r * B + bb);
    }
  }
}

// ---------------------------------------------------------------- AVX-512
#ifdef NM_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline __mmask16 lanes_left(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// Input columns of kept entries [j0, j0 + 16) of row r: one masked load of the packed bytes, one byte permute
// that puts each lane's 3-4 bytes into its dword, a variable shift and a mask.
inline __m512i decode16(const Layout& L, int64_t r, int64_t j0, __mmask16 lanes) {
  const int64_t bit0 = (r * L.k + j0) * L.bits, byte0 = bit0 >> 3;
  const __m512i lane_bit = _mm512_add_epi32(_mm512_set1_epi32(int32_t(bit0 & 7)),
                                            _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                                                4, 3, 2, 1, 0),
                                                               _mm512_set1_epi32(int32_t(L.bits))));
  const __m512i byte = _mm512_srli_epi32(lane_bit, 3);
  const __m512i perm = _mm512_add_epi32(_mm512_mullo_epi32(byte, _mm512_set1_epi32(0x01010101)),
                                        _mm512_set1_epi32(0x03020100));
  const int64_t avail = L.idx_bytes - byte0;
  const __mmask64 load_mask = avail >= 64 ? ~__mmask64(0) : ((__mmask64(1) << avail) - 1);
  const __m512i data = _mm512_maskz_loadu_epi8(load_mask, L.idx + byte0);
  const __m512i words = _mm512_permutexvar_epi8(perm, data);
  const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(words, _mm512_and_si512(lane_bit, _mm512_set1_epi32(7))),
                                       _mm512_set1_epi32(int32_t((1u << L.bits) - 1)));
  return _mm512_add_epi32(pos, _mm512_maskz_loadu_epi32(lanes, L.base + j0));
}

template <typename T, int NB>
void small_avx512(const Layout& L, const T* vals, const float* x, float* y, const float* bias, int64_t r0,
                  int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < L.k; j0 += 16) {
      const __mmask16 lanes = lanes_left(L.k - j0);
      const __m512i cols = decode16(L, r, j0, lanes);
      const __m512 v = load16(vals + r * L.k + j0, lanes);
      for (int b = 0; b < NB; ++b) {
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, cols, x + b * L.in, 4);
        acc[b] = _mm512_fmadd_ps(v, g, acc[b]);
      }
    }
    for (int b = 0; b < NB; ++b) y[b * L.out + r] = _mm512_reduce_add_ps(acc[b]) + (bias ? bias[r] : 0.f);
  }
}

template <typename T, int NQ>
void large_block_avx512(const Layout& L, const T* vals, const float* xt, int64_t B, int64_t bb, float* yt,
                        const float* bias, int64_t r0, int64_t r1) {
  alignas(64) int32_t cols[16];
  alignas(64) float v[16];
  const __mmask16 tail = lanes_left(B - bb - 16 * (NQ - 1));
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[NQ];
    for (int q = 0; q < NQ; ++q) acc[q] = _mm512_set1_ps(bias ? bias[r] : 0.f);
    for (int64_t j0 = 0; j0 < L.k; j0 += 16) {
      const __mmask16 lanes = lanes_left(L.k - j0);
      _mm512_store_si512(cols, decode16(L, r, j0, lanes));
      _mm512_store_ps(v, load16(vals + r * L.k + j0, lanes));
      const int count = int(std::min<int64_t>(16, L.k - j0));
      for (int t = 0; t < count; ++t) {
        const float* xr = xt + int64_t(cols[t]) * B + bb;
        const __m512 vt = _mm512_set1_ps(v[t]);
        for (int q = 0; q < NQ; ++q) {
          const __mmask16 m = q == NQ - 1 ? tail : __mmask16(0xFFFF);
          acc[q] = _mm512_fmadd_ps(vt, _mm512_maskz_loadu_ps(m, xr + 16 * q), acc[q]);
        }
      }
    }
    for (int q = 0; q < NQ; ++q) {
      _mm512_mask_storeu_ps(yt + r * B + bb + 16 * q, q == NQ - 1 ? tail : __mmask16(0xFFFF), acc[q]);
    }
  }
}

template <typename T>
void small_simd(const Layout& L, const T* vals, const float* x, int64_t B, float* y, const float* bias, int64_t r0,
                int64_t r1) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * L.in;
    float* yb = y + b0 * L.out;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: small_avx512<T, 1>(L, vals, xb, yb, bias, r0, r1); break;
      case 2: small_avx512<T, 2>(L, vals, xb, yb, bias, r0, r1); break;
      case 3: small_avx512<T, 3>(L, vals, xb, yb, bias, r0, r1); break;
      default: small_avx512<T, 4>(L, vals, xb, yb, bias, r0, r1); break;
    }
  }
}

template <typename T>
void large_simd(const Layout& L, const T* vals, const float* xt, int64_t B, float* yt, const float* bias, int64_t r0,
                int64_t r1) {
  for (int64_t bb = 0; bb < B; bb += kBatchBlock) {
    switch ((std::min(kBatchBlock, B - bb) + 15) / 16) {
      case 1: large_block_avx512<T, 1>(L, vals, xt, B, bb, yt, bias, r0, r1); break;
      case 2: large_block_avx512<T, 2>(L, vals, xt, B, bb, yt, bias, r0, r1); break;
      case 3: large_block_avx512<T, 3>(L, vals, xt, B, bb, yt, bias, r0, r1); break;
      default: large_block_avx512<T, 4>(L, vals, xt, B, bb, yt, bias, r0, r1); break;
    }
  }
}
#else
template <typename T>
void small_simd(const Layout& L, const T* vals, const float* x, int64_t B, float* y, const float* bias, int64_t r0,
                int64_t r1) {
  small_portable(L, vals, x, B, y, bias, r0, r1);
}
template <typename T>
void large_simd(const Layout& L, const T* vals, const float* xt, int64_t B, float* yt, const float* bias, int64_t r0,
                int64_t r1) {
  large_portable(L, vals, xt, B, yt, bias, r0, r1);
}
#endif

// ---------------------------------------------------------------- operators
Layout make_layout(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& base, int64_t n, int64_t m,
                   int64_t bits) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "nm_linear: values must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(indices.scalar_type() == at::kByte && indices.is_contiguous(), "nm_linear: indices must be uint8");
  TORCH_CHECK(n >= 1 && m >= 2 && n <= m && bits >= 1 && bits <= 11 && (int64_t(1) << bits) >= m,
              "nm_linear: bad pattern");
  const int64_t out = values.size(0), k = values.size(1);
  TORCH_CHECK(k % n == 0, "nm_linear: kept entries per row are not a multiple of n");
  TORCH_CHECK(indices.numel() == (out * k * bits + 7) / 8, "nm_linear: index stream has the wrong length");
  return Layout{out, k / n * m, n, m, k, bits, indices.numel(), indices.data_ptr<uint8_t>(), base.data_ptr<int32_t>()};
}

at::Tensor group_base(int64_t k, int64_t n, int64_t m) {
  at::Tensor base = at::empty({k}, at::TensorOptions().dtype(at::kInt));
  int32_t* p = base.data_ptr<int32_t>();
  for (int64_t j = 0; j < k; ++j) p[j] = int32_t(j / n * m);
  return base;
}

// Runs fn with a null pointer of the C++ type of `dtype` (fp32, bf16 or fp16 values).
template <typename Fn>
void dispatch_values(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<at::BFloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "nm_linear: values must be float32, bfloat16 or float16, not ", dtype);
  }
}

// Rows per task: at least kMinWork multiply-adds each, so that small layers run on the calling thread (waking
// the pool costs more than they do, and on a busy machine a descheduled helper stalls the whole call).
constexpr int64_t kMinWork = 1 << 17;
int64_t grain(const Layout& L, int64_t batch) {
  const int64_t work_per_row = std::max<int64_t>(1, L.k * std::max<int64_t>(batch, 1));
  return std::max<int64_t>({8, L.out / (4 * at::get_num_threads()), kMinWork / work_per_row});
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t bits, int64_t large_from,
                     int64_t impl) {
  const at::Tensor base = group_base(values.size(1), n, m);
  const Layout L = make_layout(values, indices, base, n, m, bits);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.in, "nm_linear: x must be [batch, ", L.in, "]");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "nm_linear: x and values differ in dtype");
  const int64_t B = x.size(0);
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  TORCH_CHECK(!bias_f.defined() || bias_f.numel() == L.out, "nm_linear: bias has the wrong size");
  const bool portable = impl == 1;
  at::Tensor y;
  dispatch_values(values.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* vals = values.data_ptr<scalar_t>();
    if (B < large_from) {
      const at::Tensor xf = x.to(at::kFloat).contiguous();
      y = at::empty({B, L.out}, xf.options());
      const float* xp = xf.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, L.out, grain(L, B), [&](int64_t r0, int64_t r1) {
        portable ? small_portable(L, vals, xp, B, yp, bp, r0, r1) : small_simd(L, vals, xp, B, yp, bp, r0, r1);
      });
    } else {
      const at::Tensor xt = x.t().to(at::kFloat).contiguous();
      at::Tensor yt = at::empty({L.out, B}, xt.options());
      const float* xp = xt.data_ptr<float>();
      float* yp = yt.data_ptr<float>();
      at::parallel_for(0, L.out, grain(L, B), [&](int64_t r0, int64_t r1) {
        portable ? large_portable(L, vals, xp, B, yp, bp, r0, r1) : large_simd(L, vals, xp, B, yp, bp, r0, r1);
      });
      y = yt.t();
    }
  });
  return y.to(x.scalar_type()).contiguous();
}

// The dense [out, in] weight: zeros with the kept values scattered in (dropped -0.0 signs are not restored).
at::Tensor nm_densify(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, int64_t bits) {
  const at::Tensor base = group_base(values.size(1), n, m);
  const Layout L = make_layout(values, indices, base, n, m, bits);
  at::Tensor dense = at::zeros({L.out, L.in}, values.options());
  dispatch_values(values.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* vals = values.data_ptr<scalar_t>();
    scalar_t* d = dense.data_ptr<scalar_t>();
    at::parallel_for(0, L.out, grain(L, 1), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < L.k; ++j) d[r * L.in + L.base[j] + decode_one(L, r * L.k + j)] = vals[r * L.k + j];
      }
    });
  });
  return dense;
}

bool has_avx512() {
#ifdef NM_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(nmflow_nm, lib) {
  lib.def("linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m, int bits, int large_from, "
          "int impl) -> Tensor");
  lib.def("densify(Tensor values, Tensor indices, int n, int m, int bits) -> Tensor");
  lib.def("simd() -> bool", &has_avx512);
}

TORCH_LIBRARY_IMPL(nmflow_nm, CPU, lib) {
  lib.impl("linear", &nm_linear);
  lib.impl("densify", &nm_densify);
}
