// LoRA of a batch of tokens, each on its own adapter, on the CPU (Punica's BGMV idea).
//
// The row pool (engine/lora.py): an adapter of rank r holds r contiguous rows of every layer.
// `a_rows [P + 1, members, in]` holds A rows side by side for sibling layers that read one
// input (q/k/v, gate/up; a layer alone has one member); `b_rows [P + 1, out]` holds one
// layer's B rows (transposed, the scaling folded in). Token t of the call's range uses rows
// [first[t], first[t] + rank[t]); rank 0 means no LoRA (a base-model token, or one another
// path computes).
//
// Ops (schema in TORCH_LIBRARY below; x, a_rows, b_rows and out share one dtype: float32,
// bfloat16 or float16; sums in float32; x and out are [..., tokens, features], of which
// tokens [start, start + n) are computed, n = first's length; first and rank int32):
// - shrink(x, a_rows, first, rank, start, width) -> h [members, n, width] float32:
//   h[m, t, j] = dot(x[start + t], a_rows[first[t] + j, m]) for j < rank[t], else 0.
// - expand_(out, h, b_rows[], columns[], first, rank, start): for each member m,
//   out[start + t, columns[m] + c] += sum_{j < rank[t]} h[m, t, j] * b_rows[m][first[t] + j, c].
// - add_lora_(out, x, a_rows, b_rows[], columns[], first, rank, start): both, h kept in a
//   small buffer per block of tokens.
//
// Work is cut into blocks of up to BLOCK consecutive tokens of one adapter (same first row
// and rank), so each A and B row is read once per block; blocks run in parallel
// (at::parallel_for). add_lora_ reads a block's A rows of all members in pool order (one
// stream) and prefetches ahead in its A and B rows. Inner loops use GCC/clang vector
// extensions (no intrinsics), compiled once per instruction set with target_clones on x86
// (the loader picks the best at run time, so a cached build runs on any x86 CPU) and once,
// generic, elsewhere. 16-bit elements are widened and rounded (to nearest even) in place,
// without shuffles (`Elem`).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lora_serve {
namespace {

constexpr int BLOCK = 4;   // tokens of one adapter computed together
constexpr int LANES = 16;  // floats per vector (one zmm; two ymm or four xmm elsewhere)
// Software prefetch, one cache line per row and chunk, this far ahead in the same rows: A rows
// (the shrink reads an adapter's rows front to back, and the next block's usually follow in
// the pool) and B rows (the expand's column passes). A step's pool rows come from memory,
// and the hardware prefetcher alone reached about half of this CPU's bandwidth at 32 adapters.
constexpr int AHEAD_ROWS = 8;
constexpr int AHEAD_PASSES = 2;

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vu32 __attribute__((vector_size(LANES * sizeof(uint32_t))));

#define LORA_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORA_CLONES
#endif

template <typename V, typename From>
LORA_INLINE V bits_as(const From& v) {
  static_assert(sizeof(V) == sizeof(From));
  V out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// Element access by chunks of 64 bytes (C elements), each held as P float vectors. A 16-bit
// chunk is read as 16 32-bit words: the even elements are the words shifted left by 16, the
// odd ones the words' upper halves, so no lanes move (no shuffles, any vector ISA). The
// order of floats inside a chunk is therefore not the elements' order; dot products do not
// care as long as both sides use it (`load` for both), and `store` puts them back.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using raw = float;
  static constexpr int C = LANES, P = 1;
  static LORA_INLINE float get(raw v) { return v; }
  static LORA_INLINE raw put(float v) { return v; }
  static LORA_INLINE void load(const raw* p, vfloat* v) { std::memcpy(v, p, sizeof(vfloat)); }
  static LORA_INLINE void store(raw* p, const vfloat* v) { std::memcpy(p, v, sizeof(vfloat)); }
};

template <>
struct Elem<c10::BFloat16> {  // raw bits; float -> bf16 rounds to nearest even, as torch does
  using raw = uint16_t;
  static constexpr int C = 2 * LANES, P = 2;
  static LORA_INLINE float get(raw v) { return bits_as<float>(uint32_t(v) << 16); }
  static LORA_INLINE raw put(float f) {
    if (f != f) return 0x7FC0;
    uint32_t bits = bits_as<uint32_t>(f);
    return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
  static LORA_INLINE void load(const raw* p, vfloat* v) {
    vu32 words;
    std::memcpy(&words, p, sizeof words);
    v[0] = bits_as<vfloat>(words << 16);
    v[1] = bits_as<vfloat>(words & 0xFFFF0000u);
  }
  static LORA_INLINE vu32 rounded(vfloat v) {  // bf16 bits in the upper half; NaN -> 0x7FC0
    vu32 bits = bits_as<vu32>(v);
    vu32 r = bits + 0x7FFFu + ((bits >> 16) & 1u);
    vu32 nan = (vu32)(v != v);
    return (r & ~nan) | (nan & 0x7FC00000u);
  }
  static LORA_INLINE void store(raw* p, const vfloat* v) {
    vu32 words = (rounded(v[0]) >> 16) | (rounded(v[1]) & 0xFFFF0000u);
    std::memcpy(p, &words, sizeof words);
  }
};

template <>
struct Elem<c10::Half> {  // raw bits, even/odd words as for bf16; c10's conversions, lane-wise
  using raw = uint16_t;
  static constexpr int C = 2 * LANES, P = 2;
  static LORA_INLINE float get(raw v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static LORA_INLINE raw put(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
  // c10::detail::fp16_ieee_to_fp32_value on each lane's low 16 bits (branches as selects).
  static LORA_INLINE vfloat widen(vu32 h) {
    const vu32 w = h << 16, sign = w & 0x80000000u, two_w = w + w;
    const vfloat normalized = bits_as<vfloat>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const vfloat denormalized = bits_as<vfloat>((two_w >> 17) | (126u << 23)) - 0.5f;
    const vu32 small = (vu32)(two_w < (1u << 27));
    return bits_as<vfloat>(sign | (bits_as<vu32>(denormalized) & small) | (bits_as<vu32>(normalized) & ~small));
  }
  // c10::detail::fp16_ieee_from_fp32_value on each lane, into its low 16 bits.
  static LORA_INLINE vu32 narrow(vfloat f) {
    const vu32 w = bits_as<vu32>(f), shl1_w = w + w, sign = w & 0x80000000u;
    vfloat base = (bits_as<vfloat>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    vu32 bias = shl1_w & 0xFF000000u;
    const vu32 low = (vu32)(bias < 0x71000000u);
    bias = (bias & ~low) | (low & 0x71000000u);
    base = bits_as<vfloat>((bias >> 1) + 0x07800000u) + base;
    const vu32 bits = bits_as<vu32>(base);
    const vu32 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const vu32 nan = (vu32)(shl1_w > 0xFF000000u);
    return (sign >> 16) | (nan & 0x7E00u) | (nonsign & ~nan);
  }
  static LORA_INLINE void load(const raw* p, vfloat* v) {
    vu32 words;
    std::memcpy(&words, p, sizeof words);
    v[0] = widen(words & 0xFFFFu);
    v[1] = widen(words >> 16);
  }
  static LORA_INLINE void store(raw* p, const vfloat* v) {
    vu32 words = narrow(v[0]) | (narrow(v[1]) << 16);
    std::memcpy(p, &words, sizeof words);
  }
};

typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vfloat4 __attribute__((vector_size(4 * sizeof(float))));

// The sum of a vector's lanes, halving it (16 -> 8 -> 4 lanes) with vector adds first:
// a chain of 16 dependent scalar adds would cost more than the dot product's main loop.
LORA_INLINE float lane_sum(vfloat v) {
  vfloat8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  vfloat8 s8 = lo + hi;
  vfloat4 a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  vfloat4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// xf[k] for a row of K elements: whole chunks as `load` gives them, then the tail in order.
template <typename T>
LORA_INLINE void to_floats(const typename Elem<T>::raw* x, int64_t K, float* xf) {
  using E = Elem<T>;
  int64_t k = 0;
  for (; k + E::C <= K; k += E::C) {
    vfloat v[E::P];
    E::load(x + k, v);
    std::memcpy(xf + k, v, sizeof v);
  }
  for (; k < K; ++k) xf[k] = E::get(x[k]);
}

// One block of NB tokens of one adapter: h[t * hs + j * hj] = dot(x_t, A row j) for j < rows.
// xf: the NB tokens as `to_floats` gives them, K apart; a: the first A row, rows `as`
// elements apart. Two rows at a time, for more independent sums.
template <typename T, int NB>
LORA_INLINE void shrink_block(const float* xf, int64_t K, const typename Elem<T>::raw* a, int64_t as, int rank,
                              float* h, int64_t hs, int64_t hj) {
  using E = Elem<T>;
  constexpr int P = E::P;
  const int64_t KC = K - K % E::C;
  int j = 0;
  for (; j + 2 <= rank; j += 2) {
    const auto* r0 = a + j * as;
    const auto* r1 = r0 + as;
    vfloat acc[2][NB][P] = {};
    for (int64_t k = 0; k < KC; k += E::C) {
      vfloat a0[P], a1[P];
      __builtin_prefetch(r0 + k + AHEAD_ROWS * as), __builtin_prefetch(r1 + k + AHEAD_ROWS * as);
      E::load(r0 + k, a0);
      E::load(r1 + k, a1);
      for (int t = 0; t < NB; ++t)
        for (int p = 0; p < P; ++p) {
          vfloat xv;
          std::memcpy(&xv, xf + t * K + k + p * LANES, sizeof xv);
          acc[0][t][p] += xv * a0[p];
          acc[1][t][p] += xv * a1[p];
        }
    }
    for (int t = 0; t < NB; ++t) {
      vfloat s0 = acc[0][t][0], s1 = acc[1][t][0];
      for (int p = 1; p < P; ++p) s0 += acc[0][t][p], s1 += acc[1][t][p];
      float d0 = lane_sum(s0), d1 = lane_sum(s1);
      for (int64_t k = KC; k < K; ++k) d0 += xf[t * K + k] * E::get(r0[k]), d1 += xf[t * K + k] * E::get(r1[k]);
      h[t * hs + j * hj] = d0;
      h[t * hs + (j + 1) * hj] = d1;
    }
  }
  for (; j < rank; ++j) {
    const auto* r0 = a + j * as;
    vfloat acc[NB][P] = {};
    for (int64_t k = 0; k < KC; k += E::C) {
      vfloat a0[P];
      E::load(r0 + k, a0);
      for (int t = 0; t < NB; ++t)
        for (int p = 0; p < P; ++p) {
          vfloat xv;
          std::memcpy(&xv, xf + t * K + k + p * LANES, sizeof xv);
          acc[t][p] += xv * a0[p];
        }
    }
    for (int t = 0; t < NB; ++t) {
      vfloat s0 = acc[t][0];
      for (int p = 1; p < P; ++p) s0 += acc[t][p];
      float d0 = lane_sum(s0);
      for (int64_t k = KC; k < K; ++k) d0 += xf[t * K + k] * E::get(r0[k]);
      h[t * hs + j * hj] = d0;
    }
  }
}

// out[t * os + c] += sum_{j < rank} h[t * hs + j * hj] * b[j * bs + c] for c < N, NB tokens:
// CV chunks of columns per pass (NB * CV * P independent sums), then single chunks, then the
// columns past the last whole chunk one by one.
template <typename T, int NB>
LORA_INLINE void expand_block(typename Elem<T>::raw* out, int64_t os, const float* h, int64_t hs, int64_t hj,
                              const typename Elem<T>::raw* b, int64_t bs, int rank, int64_t N) {
  using E = Elem<T>;
  constexpr int P = E::P, CV = NB <= 2 ? 4 : 2;
  int64_t c = 0;
  for (; c + CV * E::C <= N; c += CV * E::C) {
    vfloat acc[NB][CV][P] = {};
    for (int j = 0; j < rank; ++j) {
      vfloat bv[CV][P];
      for (int v = 0; v < CV; ++v) __builtin_prefetch(b + j * bs + c + (AHEAD_PASSES * CV + v) * E::C);
      for (int v = 0; v < CV; ++v) E::load(b + j * bs + c + v * E::C, bv[v]);
      for (int t = 0; t < NB; ++t) {
        const float w = h[t * hs + j * hj];
        for (int v = 0; v < CV; ++v)
          for (int p = 0; p < P; ++p) acc[t][v][p] += w * bv[v][p];
      }
    }
    for (int t = 0; t < NB; ++t)
      for (int v = 0; v < CV; ++v) {
        auto* o = out + t * os + c + v * E::C;
        vfloat ov[P];
        E::load(o, ov);
        for (int p = 0; p < P; ++p) ov[p] += acc[t][v][p];
        E::store(o, ov);
      }
  }
  for (; c + E::C <= N; c += E::C) {
    vfloat acc[NB][P] = {};
    for (int j = 0; j < rank; ++j) {
      vfloat bv[P];
      E::load(b + j * bs + c, bv);
      for (int t = 0; t < NB; ++t)
        for (int p = 0; p < P; ++p) acc[t][p] += h[t * hs + j * hj] * bv[p];
    }
    for (int t = 0; t < NB; ++t) {
      auto* o = out + t * os + c;
      vfloat ov[P];
      E::load(o, ov);
      for (int p = 0; p < P; ++p) ov[p] += acc[t][p];
      E::store(o, ov);
    }
  }
  for (; c < N; ++c)
    for (int t = 0; t < NB; ++t) {
      float s = 0.f;
      for (int j = 0; j < rank; ++j) s += h[t * hs + j * hj] * E::get(b[j * bs + c]);
      out[t * os + c] = E::put(E::get(out[t * os + c]) + s);
    }
}

// What one call computes, as raw pointers and strides (elements). Unused parts are null.
template <typename T>
struct Call {
  using raw = typename Elem<T>::raw;
  const raw* x = nullptr;  // token 0 of the range
  int64_t xs = 0, K = 0;
  const raw* a = nullptr;  // a_rows[0, 0]
  int64_t a_row = 0, a_member = 0;
  int members = 0;
  std::vector<const raw*> b;  // per member: b_rows[m][0]
  std::vector<int64_t> bs, N;
  raw* out = nullptr;  // token 0 of the range
  int64_t os = 0;
  std::vector<int64_t> columns;
  float* h = nullptr;  // h[0, 0, 0] of the shrink op's output or the expand op's input
  int64_t h_member = 0, hs = 0;
};

struct Block {
  int64_t token;  // from the range's start
  int nb;
  int64_t first;
  int rank;
};

// What a block does: 1 = shrink into call.h, 2 = expand from call.h, 3 = both (own buffer).
template <typename T, int NB>
LORA_INLINE void run_block_nb(const Call<T>& call, const Block& blk, int what, std::vector<float>& xf,
                              std::vector<float>& hbuf) {
  const int r = blk.rank, M = call.members;
  const auto* a = call.a + blk.first * call.a_row;
  // h[m * hm + t * hs + j * hj]: member m's row j of token t. Both ops at once with the
  // members of a pool row side by side (a_rows [P + 1, M, in] contiguous): the adapter's A
  // rows are r * M vectors end to end, read in that order (one stream, not M strided ones),
  // so h holds row j of member m at j * M + m.
  const bool interleaved = what == 3 && call.a_row == M * call.a_member;
  float* h;
  int64_t hm, hs, hj;
  if (what == 3) {
    hbuf.resize(size_t(M) * NB * r);
    h = hbuf.data();
    if (interleaved)
      hm = 1, hs = int64_t(r) * M, hj = M;
    else
      hm = int64_t(NB) * r, hs = r, hj = 1;
  } else {
    h = call.h + blk.token * call.hs, hm = call.h_member, hs = call.hs, hj = 1;
  }
  if (what & 1) {
    xf.resize(size_t(NB) * call.K);
    for (int t = 0; t < NB; ++t) to_floats<T>(call.x + (blk.token + t) * call.xs, call.K, xf.data() + t * call.K);
    if (interleaved)
      shrink_block<T, NB>(xf.data(), call.K, a, call.a_member, r * M, h, hs, 1);
    else
      for (int m = 0; m < M; ++m) shrink_block<T, NB>(xf.data(), call.K, a + m * call.a_member, call.a_row, r, h + m * hm, hs, 1);
  }
  if (what & 2) {
    for (int m = 0; m < M; ++m)
      expand_block<T, NB>(call.out + blk.token * call.os + call.columns[m], call.os, h + m * hm, hs, hj,
                          call.b[m] + blk.first * call.bs[m], call.bs[m], r, call.N[m]);
  }
}

template <typename T>
LORA_INLINE void run_block(const Call<T>& call, const Block& blk, int what, std::vector<float>& xf,
                           std::vector<float>& hbuf) {
  switch (blk.nb) {
    case 1: return run_block_nb<T, 1>(call, blk, what, xf, hbuf);
    case 2: return run_block_nb<T, 2>(call, blk, what, xf, hbuf);
    case 3: return run_block_nb<T, 3>(call, blk, what, xf, hbuf);
    default: return run_block_nb<T, BLOCK>(call, blk, what, xf, hbuf);
  }
}

// One entry per element type, compiled once per instruction set (LORA_CLONES).
LORA_CLONES void run_float(const Call<float>& c, const Block& b, int what, std::vector<float>& xf,
                           std::vector<float>& h) {
  run_block<float>(c, b, what, xf, h);
}
LORA_CLONES void run_bf16(const Call<c10::BFloat16>& c, const Block& b, int what, std::vector<float>& xf,
                          std::vector<float>& h) {
  run_block<c10::BFloat16>(c, b, what, xf, h);
}
LORA_CLONES void run_half(const Call<c10::Half>& c, const Block& b, int what, std::vector<float>& xf,
                          std::vector<float>& h) {
  run_block<c10::Half>(c, b, what, xf, h);
}

void run(const Call<float>& c, const Block& b, int what, std::vector<float>& xf, std::vector<float>& h) {
  run_float(c, b, what, xf, h);
}
void run(const Call<c10::BFloat16>& c, const Block& b, int what, std::vector<float>& xf, std::vector<float>& h) {
  run_bf16(c, b, what, xf, h);
}
void run(const Call<c10::Half>& c, const Block& b, int what, std::vector<float>& xf, std::vector<float>& h) {
  run_half(c, b, what, xf, h);
}

// ----- checks and blocks ---------------------------------------------------------------

// The blocks of tokens with rank > 0, after checking every token's rows lie in [0, rows).
std::vector<Block> blocks_of(const at::Tensor& first, const at::Tensor& rank, int64_t rows, int64_t max_rank) {
  TORCH_CHECK(first.scalar_type() == at::kInt && rank.scalar_type() == at::kInt, "first and rank must be int32");
  TORCH_CHECK(first.dim() == 1 && first.sizes() == rank.sizes(), "first and rank must be 1-d, of one length");
  TORCH_CHECK(first.is_contiguous() && rank.is_contiguous(), "first and rank must be contiguous");
  const int32_t* f = first.data_ptr<int32_t>();
  const int32_t* r = rank.data_ptr<int32_t>();
  const int64_t n = first.numel();
  std::vector<Block> blocks;
  for (int64_t t = 0; t < n;) {
    TORCH_CHECK(r[t] >= 0 && r[t] <= max_rank, "token ", t, ": rank ", r[t], " outside [0, ", max_rank, "]");
    if (r[t] == 0) {
      ++t;
      continue;
    }
    TORCH_CHECK(f[t] >= 0 && int64_t(f[t]) + r[t] <= rows, "token ", t, ": rows [", f[t], ", ", f[t] + r[t],
                ") outside the pool's ", rows);
    int nb = 1;
    while (nb < BLOCK && t + nb < n && f[t + nb] == f[t] && r[t + nb] == r[t]) ++nb;
    blocks.push_back({t, nb, f[t], r[t]});
    t += nb;
  }
  return blocks;
}

void check_rows_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, "'s last dimension must be contiguous");
}

// [..., tokens, features] as [tokens, features] (a view: out is written in place), its
// tokens [start, start + n) checked to exist.
at::Tensor token_rows(const at::Tensor& t, const char* name, int64_t start, int64_t n) {
  TORCH_CHECK(t.dim() >= 2, name, " must be [..., tokens, features]");
  at::Tensor rows = t.dim() == 2 ? t : t.view({-1, t.size(-1)});
  TORCH_CHECK(start >= 0 && start + n <= rows.size(0), "tokens [", start, ", ", start + n, ") outside ", name, "'s ",
              rows.size(0));
  return rows;
}

template <typename T>
void set_shrink(Call<T>& c, const at::Tensor& x, const at::Tensor& a_rows, int64_t start) {
  using raw = typename Elem<T>::raw;
  check_rows_tensor(x, "x");
  check_rows_tensor(a_rows, "a_rows");
  TORCH_CHECK(a_rows.dim() == 3, "a_rows must be [rows, members, in]");
  TORCH_CHECK(a_rows.size(2) == x.size(1), "a_rows has ", a_rows.size(2), " columns, x ", x.size(1));
  TORCH_CHECK(a_rows.scalar_type() == x.scalar_type(), "a_rows and x must share a dtype");
  c.x = reinterpret_cast<const raw*>(x.data_ptr()) + start * x.stride(0);
  c.xs = x.stride(0), c.K = x.size(1);
  c.a = reinterpret_cast<const raw*>(a_rows.data_ptr());
  c.a_row = a_rows.stride(0), c.a_member = a_rows.stride(1), c.members = int(a_rows.size(1));
}

template <typename T>
void set_expand(Call<T>& c, const at::Tensor& out, at::TensorList b_rows, at::IntArrayRef columns, int64_t start,
                int64_t rows) {
  using raw = typename Elem<T>::raw;
  check_rows_tensor(out, "out");
  TORCH_CHECK(b_rows.size() == columns.size(), "one column offset per member's b_rows");
  c.out = reinterpret_cast<raw*>(out.data_ptr()) + start * out.stride(0);
  c.os = out.stride(0);
  for (size_t m = 0; m < b_rows.size(); ++m) {
    const at::Tensor& b = b_rows[m];
    check_rows_tensor(b, "b_rows");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == rows, "b_rows must be [", rows, ", out] like a_rows");
    TORCH_CHECK(b.scalar_type() == out.scalar_type(), "b_rows and out must share a dtype");
    TORCH_CHECK(columns[m] >= 0 && columns[m] + b.size(1) <= out.size(1), "member ", m, "'s columns [", columns[m],
                ", ", columns[m] + b.size(1), ") outside out's ", out.size(1));
    c.b.push_back(reinterpret_cast<const raw*>(b.data_ptr()));
    c.bs.push_back(b.stride(0));
    c.N.push_back(b.size(1));
  }
  c.columns.assign(columns.begin(), columns.end());
}

template <typename T>
void run_blocks(const Call<T>& call, const std::vector<Block>& blocks, int what) {
  at::parallel_for(0, int64_t(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf, h;
    for (int64_t i = begin; i < end; ++i) {
      run(call, blocks[i], what, xf, h);
    }
  });
}

#define LORA_DISPATCH(dtype, ...)                                                 \
  switch (dtype) {                                                               \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }          \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }       \
    default: TORCH_CHECK(false, "LoRA kernel: unsupported dtype ", dtype);       \
  }

// ----- the ops ------------------------------------------------------------------------

at::Tensor shrink(const at::Tensor& x_in, const at::Tensor& a_rows, const at::Tensor& first, const at::Tensor& rank,
                  int64_t start, int64_t width) {
  const at::Tensor x = token_rows(x_in, "x", start, first.numel());
  const int64_t members = a_rows.dim() == 3 ? a_rows.size(1) : 0;
  at::Tensor h = at::zeros({members, first.numel(), width}, x.options().dtype(at::kFloat));
  LORA_DISPATCH(x.scalar_type(), [&] {
    Call<scalar_t> call;
    set_shrink(call, x, a_rows, start);
    auto blocks = blocks_of(first, rank, a_rows.size(0), width);
    call.h = h.data_ptr<float>(), call.h_member = h.stride(0), call.hs = width;
    run_blocks(call, blocks, 1);
  });
  return h;
}

void expand_(const at::Tensor& out_in, const at::Tensor& h, at::TensorList b_rows, at::IntArrayRef columns,
             const at::Tensor& first, const at::Tensor& rank, int64_t start) {
  const int64_t n = first.numel();
  const at::Tensor out = token_rows(out_in, "out", start, n);
  TORCH_CHECK(!b_rows.empty(), "expand_ needs b_rows");
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 3, "h must be contiguous float32 "
              "[members, tokens, width]");
  TORCH_CHECK(h.size(0) == int64_t(b_rows.size()) && h.size(1) == n, "h must be [", b_rows.size(), ", ", n, ", width]");
  LORA_DISPATCH(out.scalar_type(), [&] {
    Call<scalar_t> call;
    set_expand(call, out, b_rows, columns, start, b_rows[0].size(0));
    call.members = int(b_rows.size());
    auto blocks = blocks_of(first, rank, b_rows[0].size(0), h.size(2));
    call.h = h.data_ptr<float>(), call.h_member = h.stride(0), call.hs = h.size(2);
    run_blocks(call, blocks, 2);
  });
}

void add_lora_(const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& a_rows, at::TensorList b_rows,
               at::IntArrayRef columns, const at::Tensor& first, const at::Tensor& rank, int64_t start) {
  const int64_t n = first.numel();
  const at::Tensor x = token_rows(x_in, "x", start, n);
  const at::Tensor out = token_rows(out_in, "out", start, n);
  TORCH_CHECK(x.size(0) == out.size(0), "x has ", x.size(0), " tokens, out ", out.size(0));
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x must share a dtype");
  LORA_DISPATCH(x.scalar_type(), [&] {
    Call<scalar_t> call;
    set_shrink(call, x, a_rows, start);
    TORCH_CHECK(int64_t(b_rows.size()) == call.members, "a_rows has ", call.members, " members, b_rows ",
                b_rows.size());
    set_expand(call, out, b_rows, columns, start, a_rows.size(0));
    auto blocks = blocks_of(first, rank, a_rows.size(0), a_rows.size(0));
    run_blocks(call, blocks, 3);
  });
}

}  // namespace

TORCH_LIBRARY(lora_serve, m) {
  m.def("shrink(Tensor x, Tensor a_rows, Tensor first, Tensor rank, int start, int width) -> Tensor");
  m.def("expand_(Tensor(a!) out, Tensor h, Tensor[] b_rows, int[] columns, Tensor first, Tensor rank, int start) "
        "-> ()");
  m.def("add_lora_(Tensor(a!) out, Tensor x, Tensor a_rows, Tensor[] b_rows, int[] columns, Tensor first, "
        "Tensor rank, int start) -> ()");
}

TORCH_LIBRARY_IMPL(lora_serve, CPU, m) {
  m.impl("shrink", &shrink);
  m.impl("expand_", &expand_);
  m.impl("add_lora_", &add_lora_);
}

}  // namespace lora_serve
