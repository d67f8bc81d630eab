// y = x W^T + b for an N:M-sparse W [out, in] held as kept values and packed in-group positions, in nmflow's
// "row blocks" order: rows in blocks of 16, and within a block kept entry j of its 16 rows side by side
// (element ((row / 16) * K + j) * 16 + row % 16, K = in / M * N kept per row); the last out % 16 rows follow,
// row by row. Positions take `bits` bits each, packed least significant bit first into one uint8 stream in the
// same order, so 16 positions of a block are 2 * bits whole bytes.
//
// The AVX-512 path (F, BW, VL, VBMI; compiled when the compiler targets such a CPU, -march=native) computes 16
// rows at once: for each group of M inputs (M <= 32) it loads those inputs once per batch row, and for each of
// the N kept slots decodes the 16 positions (a byte permute, a shift, a mask), loads the 16 values and picks the
// 16 inputs with one register permute, then FMAs: no gathers, so a batch-1 product runs at memory speed. With
// AVX512-BF16, bf16 layers (M <= 16) take two kept entries per dot-product instruction instead, and 2:4 bf16
// layers from 32 batch rows turn the lanes around (batch rows, not output rows; see pairs_bf16). An AVX2 version
// (M <= 16) serves CPUs without AVX-512. The portable path (other CPUs, M > 32, the last out % 16 rows, and
// impl=1 for the tests) decodes 256 entries of a row into buffers and leaves the loops to the compiler's
// vectoriser: it gathers from x for few batch rows, and for many scales contiguous runs of x^T. All paths
// accumulate in fp32 and thread over rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define NM_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NM_AVX2 1
#include <immintrin.h>
#endif

namespace {

struct Layout {
  int64_t out, in, n, m, k, bits, idx_bytes, blocks;  // blocks: full blocks of 16 rows
  const uint8_t* idx;
  const int32_t* base;  // base[j] = (j / n) * m: the first input column of kept entry j's group
};

constexpr int64_t kChunk = 256;  // kept weights decoded at a time by the portable paths

// Where kept entry j of row r sits in the row-blocks order.
inline int64_t elem(const Layout& L, int64_t r, int64_t j) {
  const int64_t head = L.blocks * 16;
  return r < head ? ((r >> 4) * L.k + j) * 16 + (r & 15) : head * L.k + (r - head) * L.k + j;
}

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
  for (int64_t t = 0; t < count; ++t) {
    const int64_t e = elem(L, r, j0 + t);
    cols[t] = L.base[j0 + t] + decode_one(L, e);
    v[t] = static_cast<float>(vals[e]);
  }
}

// ---------------------------------------------------------------- portable
template <typename T>
void small_portable(const Layout& L, const T* vals, const float* x, int64_t xs, int64_t B, float* y,
                    const float* bias, int64_t r0, int64_t r1) {
  int32_t cols[kChunk];
  float v[kChunk];
  std::vector<float> acc(B);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j0 = 0; j0 < L.k; j0 += kChunk) {
      const int64_t count = std::min(kChunk, L.k - j0);
      decode_chunk(L, vals, r, j0, count, cols, v);
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * xs;
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
constexpr bool kSimd = true;
constexpr int64_t kSimdMaxM = 32;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Decodes the 16 positions of one block entry: its 2 * bits bytes are loaded (masked at the end of the stream),
// a byte permute gives each lane the 4 bytes from its first bit on, a variable shift and a mask finish.
struct Decoder {
  __m512i perm, shift, mask;
  explicit Decoder(int64_t bits) {
    const __m512i lane_bit = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int32_t(bits)));
    perm = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(lane_bit, 3), _mm512_set1_epi32(0x01010101)),
                            _mm512_set1_epi32(0x03020100));
    shift = _mm512_and_si512(lane_bit, _mm512_set1_epi32(7));
    mask = _mm512_set1_epi32(int32_t((1u << bits) - 1));
  }
  __m512i operator()(const Layout& L, int64_t entry) const {
    const int64_t byte0 = entry * 2 * L.bits, avail = L.idx_bytes - byte0;
    const __mmask16 load_mask = avail >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << avail) - 1);
    const __m512i data = _mm512_zextsi128_si512(_mm_maskz_loadu_epi8(load_mask, L.idx + byte0));
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(perm, data), shift), mask);
  }
};

// Rows of blocks [blk0, blk1) for NB batch rows (x rows xs apart, zero-padded by 32 floats; y rows L.out apart).
// WIDE: M == 32, two registers of inputs per group; otherwise M <= 16 fits one.
constexpr int64_t kAhead = 32;  // block entries to prefetch ahead (the hardware prefetcher alone lags)

template <typename T, int NB, bool WIDE>
void blocks_avx512(const Layout& L, const T* vals, const float* x, int64_t xs, float* y, const float* bias,
                   int64_t blk0, int64_t blk1) {
  const Decoder decode(L.bits);
  const int64_t groups = L.k / L.n;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    int64_t entry = blk * L.k;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 lo[NB], hi[NB];
      for (int b = 0; b < NB; ++b) {
        lo[b] = _mm512_loadu_ps(x + b * xs + g * L.m);
        if (WIDE) hi[b] = _mm512_loadu_ps(x + b * xs + g * L.m + 16);
      }
      for (int64_t s = 0; s < L.n; ++s, ++entry) {
        _mm_prefetch(reinterpret_cast<const char*>(vals + (entry + kAhead) * 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(L.idx + (entry + kAhead) * 2 * L.bits), _MM_HINT_T0);
        const __m512i pos = decode(L, entry);
        const __m512 v = load16(vals + entry * 16);
        for (int b = 0; b < NB; ++b) {
          const __m512 picked =
              WIDE ? _mm512_permutex2var_ps(lo[b], pos, hi[b]) : _mm512_permutexvar_ps(pos, lo[b]);
          acc[b] = _mm512_fmadd_ps(v, picked, acc[b]);
        }
      }
    }
    const __m512 b16 = bias ? _mm512_loadu_ps(bias + blk * 16) : _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + b * L.out + blk * 16, _mm512_add_ps(acc[b], b16));
  }
}

template <typename T, bool WIDE>
void blocks_simd(const Layout& L, const T* vals, const float* x, int64_t xs, int64_t B, float* y, const float* bias,
                 int64_t blk0, int64_t blk1) {
  constexpr int64_t kMaxNB = WIDE ? 4 : 8;  // batch rows per pass, as many as the 32 registers hold
  for (int64_t b0 = 0; b0 < B; b0 += kMaxNB) {
    const float* xb = x + b0 * xs;
    float* yb = y + b0 * L.out;
    switch (std::min(kMaxNB, B - b0)) {
      case 1: blocks_avx512<T, 1, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 2: blocks_avx512<T, 2, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 3: blocks_avx512<T, 3, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 4: blocks_avx512<T, 4, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 5: blocks_avx512<T, 5, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 6: blocks_avx512<T, 6, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 7: blocks_avx512<T, 7, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      default: blocks_avx512<T, 8, WIDE>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
    }
  }
}
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

// bf16 values and inputs, M <= 16, an even number of kept entries per row: two kept entries at a time with the
// AVX512-BF16 dot product (two multiply-adds per lane and instruction, fp32 accumulation). Word 2i of the pair
// vectors holds lane i of entry j, word 2i + 1 lane i of entry j + 1; entry j + 1's inputs lie in the same 2 M
// inputs from entry j's group on, so one 32-word register and one word permute per batch row pick both.
template <int NB>
void blocks_bf16_dot(const Layout& L, const at::BFloat16* vals, const at::BFloat16* x, int64_t xs, float* y,
                     const float* bias, int64_t blk0, int64_t blk1) {
  const Decoder decode(L.bits);
  alignas(64) int16_t interleave[32];
  for (int w = 0; w < 32; ++w) interleave[w] = int16_t((w & 1) * 16 + (w >> 1));
  const __m512i pair_order = _mm512_load_si512(interleave);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t j = 0, entry = blk * L.k; j < L.k; j += 2, entry += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(vals + (entry + kAhead) * 16), _MM_HINT_T0);
      const int64_t start = L.base[j];
      const __m512i first = decode(L, entry);
      const __m512i second = _mm512_add_epi32(decode(L, entry + 1), _mm512_set1_epi32(L.base[j + 1] - start));
      const __m512i picks = _mm512_or_si512(first, _mm512_slli_epi32(second, 16));
      const __m512i v = _mm512_permutexvar_epi16(pair_order, _mm512_loadu_si512(vals + entry * 16));
      for (int b = 0; b < NB; ++b) {
        const __m512i inputs = _mm512_loadu_si512(x + b * xs + start);
        const __m512i picked = _mm512_permutexvar_epi16(picks, inputs);
        acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)v, (__m512bh)picked);
      }
    }
    const __m512 b16 = bias ? _mm512_loadu_ps(bias + blk * 16) : _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + b * L.out + blk * 16, _mm512_add_ps(acc[b], b16));
  }
}

void blocks_bf16(const Layout& L, const at::BFloat16* vals, const at::BFloat16* x, int64_t xs, int64_t B, float* y,
                 const float* bias, int64_t blk0, int64_t blk1) {
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const at::BFloat16* xb = x + b0 * xs;
    float* yb = y + b0 * L.out;
    switch (std::min<int64_t>(8, B - b0)) {
      case 1: blocks_bf16_dot<1>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 2: blocks_bf16_dot<2>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 3: blocks_bf16_dot<3>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 4: blocks_bf16_dot<4>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 5: blocks_bf16_dot<5>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 6: blocks_bf16_dot<6>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      case 7: blocks_bf16_dot<7>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
      default: blocks_bf16_dot<8>(L, vals, xb, xs, yb, bias, blk0, blk1); break;
    }
  }
}

// 2:4 in bf16 for many batch rows: the lanes are batch rows, not output rows, so no per-row permute. For each
// group g of 4 inputs and each pair (a, b) of its positions, a < b, `pairs` holds for every batch lane the inputs
// x[4g + a] and x[4g + b] side by side; output row r then takes one dot-product instruction per 16 lanes, its two
// kept values broadcast against the pair its two positions name: one load and one instruction per 32 multiply-adds
// (dense GEMM needs far fewer loads), for half of dense's multiply-adds. The table is built once per call for up
// to 128 batch rows (the lanes); rows run in tiles of groups whose part of the table fits in L1, kPairBlocks row
// blocks at a time (their sums, up to 128 KB, stay in L2, and the table is read once per 256 rows).
constexpr int64_t kPairMaxLanes = 128, kPairBlocks = 16;
constexpr int kPairSlots = 6;  // (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)

// pairs[(g * 6 + slot) * lanes + l] for batch rows 0 .. rows of x ([B, in], xs apart); lanes past rows are zero.
// For 16 lanes of a group, two gathers fetch each row's 4 inputs (8 rows per register) and one word permute
// across both registers forms each slot's 16 pairs.
void build_pairs(const at::BFloat16* x, int64_t xs, int64_t rows, int64_t groups, int64_t lanes, uint32_t* pairs) {
  static constexpr int kA[kPairSlots] = {0, 0, 0, 1, 1, 2}, kB[kPairSlots] = {1, 2, 3, 2, 3, 3};
  __m512i pick[kPairSlots];  // word 2i: row i's input a, word 2i + 1: its input b (row i's 4 inputs: words 4i..4i+3)
  for (int s = 0; s < kPairSlots; ++s) {
    alignas(64) int16_t words[32];
    for (int i = 0; i < 16; ++i) words[2 * i] = int16_t(4 * i + kA[s]), words[2 * i + 1] = int16_t(4 * i + kB[s]);
    pick[s] = _mm512_load_si512(words);
  }
  at::parallel_for(0, groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t l0 = 0; l0 < lanes; l0 += 16) {
      alignas(32) int32_t row_start[16];  // in 2-byte units
      for (int i = 0; i < 16; ++i) row_start[i] = int32_t((l0 + i) * xs);
      const __m256i first = _mm256_load_si256(reinterpret_cast<const __m256i*>(row_start));
      const __m256i second = _mm256_load_si256(reinterpret_cast<const __m256i*>(row_start + 8));
      const int64_t live = std::clamp<int64_t>(rows - l0, 0, 16);
      const __mmask8 first_mask = __mmask8((1u << std::min<int64_t>(live, 8)) - 1);
      const __mmask8 second_mask = __mmask8((1u << std::max<int64_t>(live - 8, 0)) - 1);
      for (int64_t g = g0; g < g1; ++g) {
        const void* base = x + 4 * g;
        const __m512i lo = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), first_mask, first, base, 2);
        const __m512i hi = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), second_mask, second, base, 2);
        uint32_t* out = pairs + g * kPairSlots * lanes + l0;
        for (int s = 0; s < kPairSlots; ++s)
          _mm512_store_si512(out + s * lanes, _mm512_permutex2var_epi16(lo, pick[s], hi));
      }
    }
  });
}

// Row blocks [blk0, blk1) for the C * 16 lanes of `pairs`, into y (rows of L.out floats, `rows` of them). R rows
// at a time, so that R * C sums are in flight. Returns false, computing nothing more, at a block whose two
// positions in a group are not increasing (never the case for weights nmflow wrote).
template <int C, int R>
bool blocks_pairs(const Layout& L, const at::BFloat16* vals, const uint32_t* pairs, int64_t rows, float* y,
                  const float* bias, int64_t blk0, int64_t blk1) {
  constexpr int64_t lanes = C * 16, tile_groups = std::max<int64_t>(4, 64 / C);  // 24 KB of the table
  const Decoder decode(L.bits);
  const int64_t groups = L.k / 2;
  alignas(64) static constexpr int32_t kSlotOf[16] = {-1, 0, 1, 2, -1, -1, 3, 4, -1, -1, -1, 5, -1, -1, -1, -1};
  const __m512i slot_of = _mm512_load_si512(kSlotOf);  // [4a + b] -> slot
  alignas(64) int16_t interleave[32];
  for (int w = 0; w < 32; ++w) interleave[w] = int16_t((w & 1) * 16 + (w >> 1));
  const __m512i pair_order = _mm512_load_si512(interleave);
  alignas(64) int32_t offset[tile_groups][16];  // of row r's pair in the table, per group of the tile
  alignas(64) int32_t weights[tile_groups][16];  // row r's two kept values, per group of the tile
  // torch's CPU allocator aligns to 64 bytes, so no vector load splits a cache line
  const at::Tensor sums_buffer = at::empty({kPairBlocks * 16 * lanes}, at::TensorOptions().dtype(at::kFloat));
  float* const sums = sums_buffer.data_ptr<float>();
  for (int64_t s0 = blk0; s0 < blk1; s0 += kPairBlocks) {
    const int64_t s1 = std::min(blk1, s0 + kPairBlocks);
    std::fill(sums, sums + kPairBlocks * 16 * lanes, 0.f);
    for (int64_t g0 = 0; g0 < groups; g0 += tile_groups) {
      const int64_t tile = std::min(tile_groups, groups - g0);
      for (int64_t blk = s0; blk < s1; ++blk) {
        __mmask16 bad = 0;
        for (int64_t t = 0; t < tile; ++t) {
          const int64_t entry = blk * L.k + 2 * (g0 + t);
          const __m512i a = decode(L, entry), b = decode(L, entry + 1);
          bad |= _mm512_cmpge_epu32_mask(a, b);
          const __m512i slot = _mm512_permutexvar_epi32(_mm512_add_epi32(_mm512_slli_epi32(a, 2), b), slot_of);
          const __m512i row_offset = _mm512_mullo_epi32(
              _mm512_add_epi32(slot, _mm512_set1_epi32(int32_t((g0 + t) * kPairSlots))), _mm512_set1_epi32(lanes));
          _mm512_store_si512(offset[t], row_offset);
          _mm512_store_si512(weights[t], _mm512_permutexvar_epi16(pair_order, _mm512_loadu_si512(vals + entry * 16)));
        }
        if (bad) return false;
        float* block_sums = sums + (blk - s0) * 16 * lanes;
        for (int r0 = 0; r0 < 16; r0 += R) {
          __m512 acc[R][C];
          for (int i = 0; i < R; ++i)
            for (int c = 0; c < C; ++c) acc[i][c] = _mm512_load_ps(block_sums + (r0 + i) * lanes + c * 16);
          for (int64_t t = 0; t < tile; ++t) {
            for (int i = 0; i < R; ++i) {
              const __m512bh w = (__m512bh)_mm512_set1_epi32(weights[t][r0 + i]);
              const uint32_t* pair = pairs + offset[t][r0 + i];
              for (int c = 0; c < C; ++c)
                acc[i][c] = _mm512_dpbf16_ps(acc[i][c], w, (__m512bh)_mm512_load_si512(pair + c * 16));
            }
          }
          for (int i = 0; i < R; ++i)
            for (int c = 0; c < C; ++c) _mm512_store_ps(block_sums + (r0 + i) * lanes + c * 16, acc[i][c]);
        }
      }
    }
    for (int64_t blk = s0; blk < s1; ++blk) {  // lanes x 16 rows back into y's [batch, out] order
      const float* block_sums = sums + (blk - s0) * 16 * lanes;
      for (int64_t l = 0; l < rows; ++l) {
        for (int r = 0; r < 16; ++r) {
          const int64_t row = blk * 16 + r;
          y[l * L.out + row] = block_sums[r * lanes + l] + (bias ? bias[row] : 0.f);
        }
      }
    }
  }
  return true;
}

// The full row blocks of a 2:4 bf16 layer for B batch rows, 128 at a time; false if positions are not increasing.
bool pairs_bf16(const Layout& L, const at::BFloat16* vals, const at::BFloat16* x, int64_t xs, int64_t B, float* y,
                const float* bias, int64_t min_blocks) {
  const int64_t groups = L.in / 4;
  const int64_t most = std::min(kPairMaxLanes, (B + 15) / 16 * 16);
  const at::Tensor buffer = at::empty({groups * kPairSlots * most}, at::TensorOptions().dtype(at::kInt));
  uint32_t* const pairs = reinterpret_cast<uint32_t*>(buffer.data_ptr<int32_t>());
  for (int64_t b0 = 0; b0 < B; b0 += kPairMaxLanes) {
    const int64_t rows = std::min(kPairMaxLanes, B - b0), chunks = (rows + 15) / 16;
    build_pairs(x + b0 * xs, xs, rows, groups, chunks * 16, pairs);
    std::atomic<bool> ok{true};
    at::parallel_for(0, L.blocks, min_blocks, [&](int64_t blk0, int64_t blk1) {
      float* yb = y + b0 * L.out;
      bool done = false;
      switch (chunks) {
        case 1: done = blocks_pairs<1, 8>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 2: done = blocks_pairs<2, 4>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 3: done = blocks_pairs<3, 2>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 4: done = blocks_pairs<4, 2>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 5: done = blocks_pairs<5, 1>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 6: done = blocks_pairs<6, 1>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        case 7: done = blocks_pairs<7, 1>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
        default: done = blocks_pairs<8, 1>(L, vals, pairs, rows, yb, bias, blk0, blk1); break;
      }
      if (!done) ok = false;
    });
    if (!ok) return false;
  }
  return true;
}

#else
constexpr bool kBf16Dot = false;
void blocks_bf16(const Layout&, const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, float*, const float*,
                 int64_t, int64_t) {}
#endif
#elif defined(NM_AVX2)
// AVX2 (most laptops): the same row blocks as two 8-lane halves, M <= 16: the 16 inputs of a group are two
// registers, each half picks from both with an 8-lane permute and a blend on the position's bit 3. Positions
// are decoded from one 8-byte load (16 * bits <= 64).
constexpr bool kSimd = true;
constexpr int64_t kSimdMaxM = 16;
constexpr bool kBf16Dot = false;
void blocks_bf16(const Layout&, const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, float*, const float*,
                 int64_t, int64_t) {}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline void decode16_avx2(const Layout& L, int64_t entry, int32_t* pos) {
  const int64_t byte0 = entry * 2 * L.bits, avail = L.idx_bytes - byte0;
  uint64_t word = 0;
  std::memcpy(&word, L.idx + byte0, size_t(std::min<int64_t>(8, avail)));
  const uint64_t mask = (uint64_t(1) << L.bits) - 1;
  for (int lane = 0; lane < 16; ++lane) pos[lane] = int32_t((word >> (lane * L.bits)) & mask);
}

template <typename T, int NB>
void blocks_avx2(const Layout& L, const T* vals, const float* x, int64_t xs, float* y, const float* bias,
                 int64_t blk0, int64_t blk1) {
  alignas(32) int32_t pos[16];
  const int64_t groups = L.k / L.n;
  const __m256i seven = _mm256_set1_epi32(7);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    __m256 acc[NB][2];
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    int64_t entry = blk * L.k;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 lo[NB], hi[NB];
      for (int b = 0; b < NB; ++b) {
        lo[b] = _mm256_loadu_ps(x + b * xs + g * L.m);
        hi[b] = _mm256_loadu_ps(x + b * xs + g * L.m + 8);
      }
      for (int64_t s = 0; s < L.n; ++s, ++entry) {
        decode16_avx2(L, entry, pos);
        for (int half = 0; half < 2; ++half) {
          const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(pos + 8 * half));
          const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(p, seven));
          const __m256 v = load8(vals + entry * 16 + 8 * half);
          for (int b = 0; b < NB; ++b) {
            const __m256 picked = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[b], p),
                                                   _mm256_permutevar8x32_ps(hi[b], p), upper);
            acc[b][half] = _mm256_fmadd_ps(v, picked, acc[b][half]);
          }
        }
      }
    }
    for (int half = 0; half < 2; ++half) {
      const __m256 b8 = bias ? _mm256_loadu_ps(bias + blk * 16 + 8 * half) : _mm256_setzero_ps();
      for (int b = 0; b < NB; ++b) _mm256_storeu_ps(y + b * L.out + blk * 16 + 8 * half, _mm256_add_ps(acc[b][half], b8));
    }
  }
}

template <typename T, bool WIDE>
void blocks_simd(const Layout& L, const T* vals, const float* x, int64_t xs, int64_t B, float* y, const float* bias,
                 int64_t blk0, int64_t blk1) {
  for (int64_t b0 = 0; b0 < B; b0 += 2) {
    if (B - b0 >= 2) {
      blocks_avx2<T, 2>(L, vals, x + b0 * xs, xs, y + b0 * L.out, bias, blk0, blk1);
    } else {
      blocks_avx2<T, 1>(L, vals, x + b0 * xs, xs, y + b0 * L.out, bias, blk0, blk1);
    }
  }
}
#else
constexpr bool kSimd = false;
constexpr int64_t kSimdMaxM = 0;
constexpr bool kBf16Dot = false;
void blocks_bf16(const Layout&, const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, float*, const float*,
                 int64_t, int64_t) {}
template <typename T, bool WIDE>
void blocks_simd(const Layout&, const T*, const float*, int64_t, int64_t, float*, const float*, int64_t, int64_t) {}
#endif

#if !defined(NM_AVX512) || !defined(__AVX512BF16__)
bool pairs_bf16(const Layout&, const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, float*, const float*,
                int64_t) {
  return false;
}
#endif

// ---------------------------------------------------------------- operators
// The layout of a layer's parts, checked. base[j] (the first input of kept entry j's group) lives in a buffer
// of the calling thread, reused from call to call: it is only read during this call.
Layout make_layout(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, int64_t bits) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "nm_linear: values must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(indices.scalar_type() == at::kByte && indices.is_contiguous(), "nm_linear: indices must be uint8");
  TORCH_CHECK(n >= 1 && m >= 2 && n <= m && bits >= 1 && bits <= 11 && (int64_t(1) << bits) >= m,
              "nm_linear: bad pattern");
  const int64_t out = values.size(0), k = values.size(1);
  TORCH_CHECK(k % n == 0, "nm_linear: kept entries per row are not a multiple of n");
  TORCH_CHECK(indices.numel() == (out * k * bits + 7) / 8, "nm_linear: index stream has the wrong length");
  thread_local std::vector<int32_t> base;
  base.resize(size_t(k));
  for (int64_t j = 0; j < k; ++j) base[size_t(j)] = int32_t(j / n * m);
  return Layout{out,         k / n * m, n, m, k, bits, indices.numel(), out / 16, indices.data_ptr<uint8_t>(),
                base.data()};
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
int64_t grain(const Layout& L, int64_t rows, int64_t batch) {
  const int64_t work_per_row = std::max<int64_t>(1, L.k * std::max<int64_t>(batch, 1));
  return std::max<int64_t>({1, rows / (4 * at::get_num_threads()), kMinWork / work_per_row});
}

// Batch rows from which a 2:4 bf16 layer takes the batch-lanes path (pairs_bf16) instead of the row-lanes one.
constexpr int64_t kPairsFrom = 32;

template <typename T>
void linear_rows(const Layout& L, const T* vals, const at::Tensor& x, const float* bias, float* y, int64_t large_from,
                 bool portable) {
  const int64_t B = x.size(0), xs = L.in + 32;  // x rows padded, so a group's 16 or 32 inputs load whole
  int64_t first_portable = 0;  // rows from here on take the portable path
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (kBf16Dot && !portable && L.m <= 16 && L.k % 2 == 0 && L.blocks > 0) {
      bool pairs = false;
      if (L.n == 2 && L.m == 4 && B >= kPairsFrom) {  // reads x as it is: no padding needed
        const at::Tensor xc = x.contiguous();
        pairs = pairs_bf16(L, vals, xc.data_ptr<at::BFloat16>(), L.in, B, y, bias,
                           grain(L, L.blocks, 16 * std::min<int64_t>(B, 128)));
      }
      if (!pairs) {
        at::Tensor xh = at::zeros({B, xs}, x.options());
        xh.narrow(1, 0, L.in).copy_(x);
        const at::BFloat16* xhp = xh.data_ptr<at::BFloat16>();
        at::parallel_for(0, L.blocks, grain(L, L.blocks, 16 * B), [&](int64_t b0, int64_t b1) {
          blocks_bf16(L, vals, xhp, xs, B, y, bias, b0, b1);
        });
      }
      first_portable = L.blocks * 16;
      if (first_portable == L.out) return;
    }
  }
  at::Tensor xf = at::zeros({B, xs}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, L.in).copy_(x);
  const float* xp = xf.data_ptr<float>();
  if (kSimd && !portable && L.m <= kSimdMaxM && first_portable == 0) {
    first_portable = L.blocks * 16;
    at::parallel_for(0, L.blocks, grain(L, L.blocks, 16 * B), [&](int64_t b0, int64_t b1) {
      L.m == 32 ? blocks_simd<T, true>(L, vals, xp, xs, B, y, bias, b0, b1)
                : blocks_simd<T, false>(L, vals, xp, xs, B, y, bias, b0, b1);
    });
  }
  const int64_t rows = L.out - first_portable;
  if (rows == 0) return;
  if (B < large_from) {
    at::parallel_for(first_portable, L.out, grain(L, rows, B), [&](int64_t r0, int64_t r1) {
      small_portable(L, vals, xp, xs, B, y, bias, r0, r1);
    });
    return;
  }
  const at::Tensor xt = x.t().to(at::kFloat).contiguous();
  at::Tensor yt = at::empty({rows, B}, xt.options());
  at::parallel_for(first_portable, L.out, grain(L, rows, B), [&](int64_t r0, int64_t r1) {
    large_portable(L, vals, xt.data_ptr<float>(), B, yt.data_ptr<float>() - first_portable * B, bias, r0, r1);
  });
  at::Tensor y_view = at::from_blob(y, {B, L.out}, x.options().dtype(at::kFloat));
  y_view.narrow(1, first_portable, rows).copy_(yt.t());
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t bits, int64_t large_from,
                     int64_t impl) {
  const Layout L = make_layout(values, indices, n, m, bits);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.in, "nm_linear: x must be [batch, ", L.in, "]");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "nm_linear: x and values differ in dtype");
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!bias_f.defined() || bias_f.numel() == L.out, "nm_linear: bias has the wrong size");
  at::Tensor y = at::empty({x.size(0), L.out}, x.options().dtype(at::kFloat));
  dispatch_values(values.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    linear_rows(L, values.data_ptr<scalar_t>(), x, bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                y.data_ptr<float>(), large_from, impl == 1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The dense [out, in] weight into `dense` (a reused buffer avoids the page faults of fresh memory): zeros with the
// kept values scattered in (dropped -0.0 signs are not restored).
at::Tensor& nm_densify_out(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, int64_t bits,
                           at::Tensor& dense) {
  const Layout L = make_layout(values, indices, n, m, bits);
  TORCH_CHECK(dense.is_contiguous() && dense.scalar_type() == values.scalar_type() && dense.numel() == L.out * L.in,
              "nm_densify: the output must be a contiguous [out, in] tensor of the values' dtype");
  dispatch_values(values.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* vals = values.data_ptr<scalar_t>();
    scalar_t* d = dense.data_ptr<scalar_t>();
    at::parallel_for(0, L.out, grain(L, L.out, 1), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(d + r * L.in, d + (r + 1) * L.in, scalar_t(0));  // zeroed row by row, while in cache
        for (int64_t j = 0; j < L.k; ++j) {
          const int64_t e = elem(L, r, j);
          d[r * L.in + L.base[j] + decode_one(L, e)] = vals[e];
        }
      }
    });
  });
  return dense;
}

at::Tensor nm_densify(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, int64_t bits) {
  at::Tensor dense = at::empty({values.size(0), values.size(1) / n * m}, values.options());
  return nm_densify_out(values, indices, n, m, bits, dense);
}

// Which path the compiler built: "avx512" (+ "-bf16" with the dot-product path), "avx2" or "portable".
std::string isa() {
  if (!kSimd) return "portable";
  if (kSimdMaxM == 16) return "avx2";
  return kBf16Dot ? "avx512-bf16" : "avx512";
}

}  // namespace

TORCH_LIBRARY(nmflow_nm, lib) {
  lib.def("linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m, int bits, int large_from, "
          "int impl) -> Tensor");
  lib.def("densify(Tensor values, Tensor indices, int n, int m, int bits) -> Tensor");
  lib.def("densify_out(Tensor values, Tensor indices, int n, int m, int bits, *, Tensor(a!) out) -> Tensor(a!)");
  lib.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(nmflow_nm, CPU, lib) {
  lib.impl("linear", &nm_linear);
  lib.impl("densify", &nm_densify);
  lib.impl("densify_out", &nm_densify_out);
}
