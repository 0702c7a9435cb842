// Attention of bf16 prompt chunks and decode rows over their contexts on the CPU, with AVX-512 BF16 dot products.
//
// PyTorch's CPU flash kernel widens bf16 to fp32 and multiplies at the fp32 rate; this CPU's
// bf16 dot product (vdpbf16ps: pairs of bf16 products summed into fp32) runs about four
// times that. The kernel keeps flash attention's shape (one pass over the keys in blocks, a
// running max and sum per query, no score matrix in memory) and its precision on GPUs:
// scores are exact fp32 sums of bf16 products, softmax is fp32, and the probabilities are
// rounded to bf16 for the product with the values, whose sums are fp32 again.
//
// Ops (schemas in TORCH_LIBRARY below): `attend` for prompt chunks, `decode` for decode rows.
//
// attend:
//   attend(q [H, M, D] bf16, keys [H, S, D] bf16, values [H, S, D] bf16, slots int32 [N],
//          queries n, scale) -> out [H, M, D] bf16
// H: KV heads; the query heads sharing a KV head are folded into M: row g * n + i is query i
// of head g of the group (M = group * n). Key j of the context lies in cache slot slots[j]
// (the context may lie in several runs of blocks); query i sits at position N - n + i and
// sees keys 0..N - n + i (causal within the chunk, all of the earlier context). D: a
// multiple of 16. keys / values: the cache layer, last dimension contiguous.
//
// One call: (1) repack the context's keys into tiles of 16 keys with each pair of dims
// interleaved, and its values with each pair of keys interleaved, so every vdpbf16ps reads one
// full vector (the repack is the gather: slots are read here and nowhere else); (2) for each
// KV head and group of ROWS query rows (in parallel), walk the keys in blocks of BLOCK:
// scores for ROWS x BLOCK, the online softmax update, the probabilities times the values.
// Blocks no row of the group may see (causal) are skipped.
//
// decode(q [R, Hq, D] bf16, keys [H, S, D], values [H, S, D], slots int32 [N], offsets int32 [R + 1],
//        scale) -> [R, Hq, D] bf16
// One query token per row (a decode step's rows): row r's context is the keys in slots
// slots[offsets[r]] .. slots[offsets[r + 1] - 1], in order, its own new key last, and it sees
// all of them. Query heads h * G .. h * G + G - 1 (G = Hq / H) share KV head h. Each (row, KV
// head) is a work item, in parallel: the G heads' scores one key at a time, read from its slot
// (no repack: a decode row reads each key once), an fp32 softmax, then fp32 probabilities
// times the values widened to fp32. One call per layer replaces the gather, two batched
// matmuls and a softmax (or one SDPA call per long row), each a parallel region of its own.
//
// Both ops hand their work items to torch's threads from a shared counter (parallel_items), so
// a thread preempted by another process delays one item, not half of the call.
//
// The ops are compiled for AVX-512 BF16 (function target attributes); `supported()` says
// whether this CPU has it. Callers use another path when it does not (engine/attention.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lora_serve_attention {
namespace {

constexpr int KEYS = 16;   // keys per score tile: one vector of fp32 scores
constexpr int BLOCK = 128;  // keys per softmax block
constexpr int TILES = BLOCK / KEYS;
constexpr int ROWS = 8;    // query rows computed together (each key tile is read once for them)
constexpr float LOG2E = 1.44269504088896341f;
constexpr float FLOOR = -1e30f;  // the running max before any key: finite, so exp(FLOOR - x) is 0

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define BF16_INLINE BF16_TARGET inline __attribute__((always_inline))

bool cpu_has_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// e^x for x <= 0: 2^(x log2 e) = 2^n * 2^f, n = round, |f| <= 1/2, 2^f by its
// degree-6 Taylor polynomial (relative error about 1e-7).
BF16_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below: 0 after the rounding to bf16 anyway
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(LOG2E));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The context repacked for vdpbf16ps (see the file comment). Words are bf16 pairs.
struct Packed {
  int64_t padded;  // keys, rounded up to BLOCK (the rest are zeros, masked out)
  int64_t pairs;   // D / 2
  std::vector<uint32_t> keys;    // [H][padded / KEYS][pairs][KEYS]: dims 2p, 2p+1 of key t*16+k
  std::vector<uint32_t> values;  // [H][padded / 2][D / KEYS][KEYS]: dim c of keys 2j, 2j+1
};

// fn(item) for items [0, n) on torch's threads, each thread taking the next item from a shared
// counter when done with one, not a fixed share of the range (at::parallel_for's split): on a
// host where other processes preempt one of the threads, that thread holds up only the item
// it is on while the others take the rest, instead of its whole half of the work.
template <typename Fn>
void parallel_items(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t item = next.fetch_add(1); item < n; item = next.fetch_add(1)) fn(item);
  });
}

const uint16_t* slot_row(const at::Tensor& cache, int64_t head, int32_t slot) {
  return reinterpret_cast<const uint16_t*>(cache.data_ptr<at::BFloat16>()) + head * cache.stride(0) +
         static_cast<int64_t>(slot) * cache.stride(1);
}

// A 16 x 16 transpose of 32-bit words: row i of the input becomes column i. Four stages:
// words, pairs of words, then the 128-bit lanes as a 4 x 4 transpose of the four vectors that
// hold columns 4L + c for each c.
BF16_INLINE void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i s[16];  // s[4n + c], lane L: column 4L + c of rows 4n .. 4n + 3
  for (int n = 0; n < 16; n += 4) {
    s[n] = _mm512_unpacklo_epi64(t[n], t[n + 2]);
    s[n + 1] = _mm512_unpackhi_epi64(t[n], t[n + 2]);
    s[n + 2] = _mm512_unpacklo_epi64(t[n + 1], t[n + 3]);
    s[n + 3] = _mm512_unpackhi_epi64(t[n + 1], t[n + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// One tile of keys: out[p * KEYS + k] <- dims 2p, 2p + 1 of key row k (rows[k] null: zeros).
BF16_TARGET void pack_key_tile(const uint16_t* const rows[KEYS], int64_t pairs, uint32_t* out) {
  for (int64_t first = 0; first < pairs; first += KEYS) {
    const int64_t count = std::min<int64_t>(KEYS, pairs - first);  // 16, or 8 for a head size of 16 mod 32
    const __mmask16 keep = count == KEYS ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    __m512i words[KEYS];
    for (int k = 0; k < KEYS; ++k) {
      words[k] = rows[k] ? _mm512_maskz_loadu_epi32(keep, rows[k] + 2 * first) : _mm512_setzero_si512();
    }
    transpose_16x16(words);
    for (int64_t p = 0; p < count; ++p) _mm512_storeu_si512(out + (first + p) * KEYS, words[p]);
  }
}

// One pair of value rows: out[c] <- dim c of `even` (low half) and of `odd` (high half).
BF16_TARGET void pack_value_pair(const uint16_t* even, const uint16_t* odd, int64_t dim, uint32_t* out) {
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < dim; c += 2 * KEYS) {
    const bool half = c + 2 * KEYS > dim;
    const __mmask32 keep = half ? __mmask32(0xFFFF) : ~__mmask32(0);
    const __m512i a = _mm512_maskz_loadu_epi16(keep, even + c);
    const __m512i b = odd ? _mm512_maskz_loadu_epi16(keep, odd + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + c, _mm512_permutex2var_epi16(a, low, b));
    if (!half) _mm512_storeu_si512(out + c + KEYS, _mm512_permutex2var_epi16(a, high, b));
  }
}

Packed repack(const at::Tensor& keys, const at::Tensor& values, const int32_t* slots, int64_t n_keys) {
  const int64_t heads = keys.size(0), dim = keys.size(2);
  Packed packed;
  packed.padded = (n_keys + BLOCK - 1) / BLOCK * BLOCK;
  packed.pairs = dim / 2;
  const int64_t tiles = packed.padded / KEYS;
  packed.keys.assign(heads * packed.padded * packed.pairs, 0);
  packed.values.assign(heads * packed.padded * packed.pairs, 0);
  parallel_items(heads * tiles, [&](int64_t item) {
      const int64_t head = item / tiles, tile = item % tiles;
      if (tile * KEYS >= n_keys) return;  // padding: stays zero
      const uint16_t* kbase = slot_row(keys, head, 0);  // data_ptr checks the dtype: once, not per key
      const uint16_t* vbase = slot_row(values, head, 0);
      const uint16_t* krows[KEYS];
      const uint16_t* vrows[KEYS];
      for (int k = 0; k < KEYS; ++k) {
        const int64_t key = tile * KEYS + k;
        krows[k] = key < n_keys ? kbase + slots[key] * keys.stride(1) : nullptr;
        vrows[k] = key < n_keys ? vbase + slots[key] * values.stride(1) : nullptr;
      }
      pack_key_tile(krows, packed.pairs, packed.keys.data() + (head * tiles + tile) * packed.pairs * KEYS);
      // key pair k / 2 of this tile: one word per dim, the even key in the low half
      uint32_t* vout = packed.values.data() + (head * tiles + tile) * (KEYS / 2) * dim;
      for (int k = 0; k < KEYS && vrows[k]; k += 2) pack_value_pair(vrows[k], vrows[k + 1], dim, vout + (k / 2) * dim);
  });
  return packed;
}

struct Rows {
  // the query rows [first, first + count) of one KV head, and the last key each may see
  int64_t first;
  int count;
  int64_t last_key[ROWS];
};

// Scores of ROWS query rows against one block of keys: scores[r][k], fp32, scaled. Two tiles
// at a time: 2 x ROWS independent sums keep the dot-product unit busy (its latency is longer
// than ROWS of them take to issue).
BF16_INLINE void block_scores(const uint32_t* const q[ROWS], const uint32_t* ktiles, int64_t pairs, float scale,
                              float scores[ROWS][BLOCK]) {
  for (int t = 0; t < TILES; t += 2) {
    const uint32_t* tile0 = ktiles + t * pairs * KEYS;
    const uint32_t* tile1 = tile0 + pairs * KEYS;
    __m512 acc0[ROWS], acc1[ROWS];
    for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(tile0 + p * KEYS);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(tile1 + p * KEYS);
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh qr = (__m512bh)_mm512_set1_epi32(int(q[r][p]));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], qr, k0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], qr, k1);
      }
    }
    const __m512 factor = _mm512_set1_ps(scale);
    for (int r = 0; r < ROWS; ++r) {
      _mm512_storeu_ps(scores[r] + t * KEYS, _mm512_mul_ps(acc0[r], factor));
      _mm512_storeu_ps(scores[r] + (t + 1) * KEYS, _mm512_mul_ps(acc1[r], factor));
    }
  }
}

// Online softmax over one block for one row: keys past `last` (relative to the block) get 0,
// updates max and sum, rescales the row's output, writes the bf16 probabilities.
BF16_INLINE void softmax_block(float* scores, int64_t last, float& max, float& sum, float* out, int64_t dim,
                               uint16_t* probs) {
  __m512 s[TILES];
  __mmask16 keep[TILES];
  __m512 block_max = _mm512_set1_ps(FLOOR);
  for (int t = 0; t < TILES; ++t) {
    const int64_t visible = std::clamp<int64_t>(last + 1 - t * KEYS, 0, KEYS);
    keep[t] = visible >= KEYS ? __mmask16(0xFFFF) : __mmask16((1u << visible) - 1);
    s[t] = _mm512_loadu_ps(scores + t * KEYS);
    block_max = _mm512_mask_max_ps(block_max, keep[t], block_max, s[t]);
  }
  const float new_max = std::max(max, _mm512_reduce_max_ps(block_max));
  const float correction = std::exp(max - new_max);
  const __m512 shift = _mm512_set1_ps(new_max);
  __m512 total = _mm512_setzero_ps();
  for (int t = 0; t < TILES; t += 2) {
    const __m512 p0 = _mm512_maskz_mov_ps(keep[t], exp_ps(_mm512_sub_ps(s[t], shift)));
    const __m512 p1 = _mm512_maskz_mov_ps(keep[t + 1], exp_ps(_mm512_sub_ps(s[t + 1], shift)));
    total = _mm512_add_ps(total, _mm512_add_ps(p0, p1));
    _mm512_storeu_si512(probs + t * KEYS, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
  }
  sum = sum * correction + _mm512_reduce_add_ps(total);
  max = new_max;
  if (correction != 1.0f) {
    const __m512 c = _mm512_set1_ps(correction);
    for (int64_t d = 0; d < dim; d += KEYS) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(out + d), c));
  }
}

// out[r] += probs[r] @ values of the block, for ROWS rows: two chunks of 16 columns at a time
// (2 x ROWS independent sums, as in block_scores), then the last chunk alone when D / 16 is odd.
BF16_INLINE void block_values(const uint16_t probs[ROWS][BLOCK], const uint32_t* vpairs, int64_t dim,
                              float* out[ROWS]) {
  int64_t c = 0;
  for (; c + 2 * KEYS <= dim; c += 2 * KEYS) {
    __m512 acc0[ROWS], acc1[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      acc0[r] = _mm512_loadu_ps(out[r] + c);
      acc1[r] = _mm512_loadu_ps(out[r] + c + KEYS);
    }
    for (int j = 0; j < BLOCK / 2; ++j) {
      const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vpairs + j * dim + c);
      const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vpairs + j * dim + c + KEYS);
      for (int r = 0; r < ROWS; ++r) {
        uint32_t pair;
        std::memcpy(&pair, probs[r] + 2 * j, sizeof(pair));
        const __m512bh pr = (__m512bh)_mm512_set1_epi32(int(pair));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], pr, v0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], pr, v1);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm512_storeu_ps(out[r] + c, acc0[r]);
      _mm512_storeu_ps(out[r] + c + KEYS, acc1[r]);
    }
  }
  if (c < dim) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_loadu_ps(out[r] + c);
    for (int j = 0; j < BLOCK / 2; ++j) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(vpairs + j * dim + c);
      for (int r = 0; r < ROWS; ++r) {
        uint32_t pair;
        std::memcpy(&pair, probs[r] + 2 * j, sizeof(pair));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(pair)), v);
      }
    }
    for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(out[r] + c, acc[r]);
  }
}

BF16_TARGET void attend_rows(const at::Tensor& q, const Packed& packed, int64_t head, const Rows& rows, float scale,
                             at::Tensor& result) {
  const int64_t dim = q.size(2), pairs = packed.pairs, tiles = packed.padded / KEYS;
  const uint32_t zeros[256] = {};
  const uint32_t* qrows[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    qrows[r] = r < rows.count ? reinterpret_cast<const uint32_t*>(q.data_ptr<at::BFloat16>() + head * q.stride(0) +
                                                                  (rows.first + r) * q.stride(1))
                              : zeros;
  }
  std::vector<float> out_buffer(ROWS * dim, 0.0f);
  float* out[ROWS];
  for (int r = 0; r < ROWS; ++r) out[r] = out_buffer.data() + r * dim;
  float max[ROWS], sum[ROWS];
  std::fill(max, max + ROWS, FLOOR);
  std::fill(sum, sum + ROWS, 0.0f);
  alignas(64) float scores[ROWS][BLOCK];
  alignas(64) uint16_t probs[ROWS][BLOCK];
  const int64_t last = *std::max_element(rows.last_key, rows.last_key + rows.count);
  const uint32_t* kbase = packed.keys.data() + head * tiles * pairs * KEYS;
  const uint32_t* vbase = packed.values.data() + head * (packed.padded / 2) * dim;
  for (int64_t start = 0; start <= last; start += BLOCK) {
    block_scores(qrows, kbase + (start / KEYS) * pairs * KEYS, pairs, scale, scores);
    for (int r = 0; r < ROWS; ++r) {
      const int64_t visible = r < rows.count ? rows.last_key[r] - start : -1;
      softmax_block(scores[r], visible, max[r], sum[r], out[r], dim, probs[r]);
    }
    block_values(probs, vbase + (start / 2) * dim, dim, out);
  }
  uint16_t* dest = reinterpret_cast<uint16_t*>(result.data_ptr<at::BFloat16>());
  for (int r = 0; r < rows.count; ++r) {
    const __m512 inverse = _mm512_set1_ps(1.0f / sum[r]);
    uint16_t* row = dest + head * result.stride(0) + (rows.first + r) * result.stride(1);
    for (int64_t c = 0; c < dim; c += KEYS) {
      const __m256bh converted = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(out[r] + c), inverse));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c), (__m256i)converted);
    }
  }
}

// 16 bf16 -> 16 fp32 (a bf16 is the high half of its fp32).
BF16_INLINE __m512 widen(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// scores[0 .. n) <- exp(scores - max), returns their sum (fp32).
BF16_INLINE float exponentiate(float* scores, int64_t n) {
  __m512 top = _mm512_set1_ps(FLOOR);
  for (int64_t j = 0; j < n; j += KEYS) {
    const __mmask16 keep = n - j >= KEYS ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    top = _mm512_mask_max_ps(top, keep, top, _mm512_maskz_loadu_ps(keep, scores + j));
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += KEYS) {
    const __mmask16 keep = n - j >= KEYS ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 p = _mm512_maskz_mov_ps(keep, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, scores + j), shift)));
    total = _mm512_add_ps(total, p);
    _mm512_mask_storeu_ps(scores + j, keep, p);
  }
  return _mm512_reduce_add_ps(total);
}

// One decode row, one KV head: the contexts' keys and values and G of the query heads sharing
// them (G <= 4: each key is loaded once for all of them).
struct DecodeHeads {
  const uint16_t* keys;    // the KV head's keys: key of slot s at keys + s * key_stride
  const uint16_t* values;  // likewise
  int64_t key_stride, value_stride;
  int64_t head;
  const int32_t* slots;
  int64_t n;
  int64_t dim;

  DecodeHeads(const at::Tensor& k, const at::Tensor& v, int64_t head, const int32_t* slots, int64_t n)
      : keys(slot_row(k, head, 0)), values(slot_row(v, head, 0)), key_stride(k.stride(1)), value_stride(v.stride(1)),
        head(head), slots(slots), n(n), dim(k.size(2)) {}
  const uint16_t* key(int64_t j) const { return keys + slots[j] * key_stride; }
  const uint16_t* value(int64_t j) const { return values + slots[j] * value_stride; }
};

constexpr int PREFETCH = 8;  // keys ahead: slots are scattered in blocks, out of the prefetcher's view

// scores[g * n + j] <- scale * (query g . key j), fp32 sums of bf16 products.
template <int G>
BF16_INLINE void decode_scores(const DecodeHeads& c, const uint16_t* const query[G], float scale, float* scores) {
  const __mmask32 low = 0xFFFF;  // a head size of 16 mod 32 ends with half a vector
  for (int64_t j = 0; j < c.n; ++j) {
    if (j + PREFETCH < c.n) _mm_prefetch(reinterpret_cast<const char*>(c.key(j + PREFETCH)), _MM_HINT_T0);
    const uint16_t* key = c.key(j);
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < c.dim; d += 2 * KEYS) {
      const bool half = d + 2 * KEYS > c.dim;
      const __m512bh k = (__m512bh)(half ? _mm512_maskz_loadu_epi16(low, key + d) : _mm512_loadu_si512(key + d));
      for (int g = 0; g < G; ++g) {
        const __m512bh q = (__m512bh)(half ? _mm512_maskz_loadu_epi16(low, query[g] + d) : _mm512_loadu_si512(query[g] + d));
        acc[g] = _mm512_dpbf16_ps(acc[g], q, k);
      }
    }
    for (int g = 0; g < G; ++g) scores[g * c.n + j] = _mm512_reduce_add_ps(acc[g]) * scale;
  }
}

// dest[g][col .. col + 16 VECS) <- sum over j of probs[g * n + j] * value j, times inverse[g], as
// bf16: each value row widened to fp32 once for the G heads.
template <int G, int VECS>
BF16_INLINE void decode_values(const DecodeHeads& c, const float* probs, const float inverse[G], int64_t col,
                               uint16_t* const dest[G]) {
  __m512 acc[G][VECS];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < VECS; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < c.n; ++j) {
    if (j + PREFETCH < c.n) _mm_prefetch(reinterpret_cast<const char*>(c.value(j + PREFETCH) + col), _MM_HINT_T0);
    const uint16_t* value = c.value(j) + col;
    __m512 v[VECS];
    for (int i = 0; i < VECS; ++i) v[i] = widen(value + i * KEYS);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * c.n + j]);
      for (int i = 0; i < VECS; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 scale = _mm512_set1_ps(inverse[g]);
    for (int i = 0; i < VECS; ++i) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][i], scale));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dest[g] + col + i * KEYS), (__m256i)out);
    }
  }
}

template <int G>
BF16_INLINE void decode_group(const DecodeHeads& c, const uint16_t* const query[G], float scale, uint16_t* const dest[G],
                              float* scores) {
  decode_scores<G>(c, query, scale, scores);
  float inverse[G];
  for (int g = 0; g < G; ++g) inverse[g] = 1.0f / exponentiate(scores + g * c.n, c.n);
  int64_t col = 0;
  for (; col + 4 * KEYS <= c.dim; col += 4 * KEYS) decode_values<G, 4>(c, scores, inverse, col, dest);
  for (; col < c.dim; col += KEYS) decode_values<G, 1>(c, scores, inverse, col, dest);
}

// One decode row's query heads of KV head `head` over its n keys (see the file comment), up to
// four heads at a time.
BF16_TARGET void decode_item(const at::Tensor& q, const DecodeHeads& c, int64_t row, int64_t group, float scale,
                             at::Tensor& result, std::vector<float>& scores) {
  scores.resize(4 * c.n);
  for (int64_t first = 0; first < group; first += 4) {
    const uint16_t* query[4];
    uint16_t* dest[4];
    const int count = int(std::min<int64_t>(4, group - first));
    for (int g = 0; g < count; ++g) {
      const int64_t qhead = c.head * group + first + g;
      query[g] = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()) + row * q.stride(0) + qhead * q.stride(1);
      dest[g] = reinterpret_cast<uint16_t*>(result.data_ptr<at::BFloat16>()) + row * result.stride(0) +
                qhead * result.stride(1);
    }
    switch (count) {
      case 1: decode_group<1>(c, query, scale, dest, scores.data()); break;
      case 2: decode_group<2>(c, query, scale, dest, scores.data()); break;
      case 3: decode_group<3>(c, query, scale, dest, scores.data()); break;
      default: decode_group<4>(c, query, scale, dest, scores.data()); break;
    }
  }
}

bool supported() {
  static const bool has = cpu_has_bf16();
  return has;
}

void check_tensors(const char* op, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(supported(), op, ": this CPU has no AVX-512 BF16");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.dim() == 3, op, ": q, keys, values must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16, op, ": bfloat16 tensors only");
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), op, ": CPU tensors only");
  const int64_t dim = q.size(2);
  TORCH_CHECK(keys.size(2) == dim && values.size(2) == dim, op, ": q, keys, values need the same head size");
  TORCH_CHECK(dim % KEYS == 0 && dim <= 512, op, ": the head size must be a multiple of 16, at most 512");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(2) == 1 && values.stride(2) == 1, op, ": last dimension contiguous");
}

void check_slots(const char* op, const at::Tensor& slots, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.dim() == 1 && slots.is_contiguous(), op, ": slots int32 [N]");
  const int32_t* slot = slots.data_ptr<int32_t>();
  const int64_t limit = std::min(keys.size(1), values.size(1));
  int32_t low = 0, high = 0;  // one check after a loop the compiler vectorizes: every layer checks every slot
  for (int64_t j = 0; j < slots.size(0); ++j) {
    low = std::min(low, slot[j]);
    high = std::max(high, slot[j]);
  }
  TORCH_CHECK(low >= 0 && high < limit, op, ": slot out of range");
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slots,
                  int64_t queries, double scale) {
  check_tensors("attend", q, keys, values);
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2);
  TORCH_CHECK(keys.size(0) == heads && values.size(0) == heads, "attend: q, keys, values need the same KV heads");
  check_slots("attend", slots, keys, values);
  const int64_t n_keys = slots.size(0);
  TORCH_CHECK(queries > 0 && queries <= n_keys && rows % queries == 0,
              "attend: queries must divide q's rows and be at most the context");
  const int32_t* slot = slots.data_ptr<int32_t>();
  const Packed packed = repack(keys, values, slot, n_keys);
  at::Tensor result = at::empty({heads, rows, dim}, q.options());
  const int64_t groups = (rows + ROWS - 1) / ROWS;
  parallel_items(heads * groups, [&](int64_t item) {
    Rows chunk;
    chunk.first = (item % groups) * ROWS;
    chunk.count = int(std::min<int64_t>(ROWS, rows - chunk.first));
    for (int r = 0; r < chunk.count; ++r) chunk.last_key[r] = n_keys - queries + (chunk.first + r) % queries;
    attend_rows(q, packed, item / groups, chunk, float(scale), result);
  });
  return result;
}

at::Tensor decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slots,
                  const at::Tensor& offsets, double scale) {
  check_tensors("decode", q, keys, values);
  const int64_t rows = q.size(0), heads = keys.size(0);
  TORCH_CHECK(values.size(0) == heads && q.size(1) % heads == 0,
              "decode: keys and values need the same KV heads, a divisor of q's heads");
  check_slots("decode", slots, keys, values);
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) == rows + 1, "decode: offsets int32 [R + 1]");
  const int32_t* offset = offsets.data_ptr<int32_t>();
  TORCH_CHECK(offset[0] == 0 && offset[rows] == slots.size(0), "decode: offsets must run from 0 to N");
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(offset[r + 1] > offset[r], "decode: every row needs at least one key");
  }
  const int64_t group = q.size(1) / heads;
  const int32_t* slot = slots.data_ptr<int32_t>();
  at::Tensor result = at::empty({rows, q.size(1), q.size(2)}, q.options());
  parallel_items(rows * heads, [&](int64_t item) {
    thread_local std::vector<float> scores;  // a thread's scratch, kept between calls
    const int64_t row = item / heads;
    const DecodeHeads context(keys, values, item % heads, slot + offset[row], offset[row + 1] - offset[row]);
    decode_item(q, context, row, group, float(scale), result, scores);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY(lora_serve_attention, m) {
  m.def("supported() -> bool", &supported);
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor slots, int queries, float scale) -> Tensor", &attend);
  m.def("decode(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor offsets, float scale) -> Tensor", &decode);
}

}  // namespace lora_serve_attention
