// CPU kernels for pkmlm's product-key memory layer and its row-wise Adam.
//
// Registered as torch.ops.pkmlm.*; built on first use by pkmlm/memory/kernels.py. Each kernel has a
// pure-torch twin in pkmlm/memory/layer.py or pkmlm/training/optim.py (used on other devices, other dtypes, or when
// no compiler is available) with the same arithmetic; tests/test_kernels.py compares the two.
//
// Why kernels: on the CPU, torch.topk over the n_keys sub-key scores, the (N, heads, 2, n_keys)
// gradient of those scores, and Adam's seven passes over each touched value row are each a full
// memory pass. Here the scores of a block of tokens stay in cache from matmul to selection, the
// backward touches only the selected sub-keys, and Adam reads and writes each row once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PKMLM_X86_SIMD 1
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// A float's bits mapped to an unsigned int with the same order (NaN above +inf, as torch.topk ranks it).
inline uint32_t orderable(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits ^ ((bits >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}

// (value, id) as one integer key: larger value first, then smaller id, under integer comparison.
inline uint64_t pack_bits(uint32_t bits, uint32_t id) {  // bits: orderable(value)
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - id);
}
inline uint64_t pack(float value, uint32_t id) { return pack_bits(orderable(value), id); }
inline uint32_t unpack_id(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

// Appends pack(s[j], j) for every j in [j, n) whose orderable bits are >= bound to out[count..), branch-free;
// returns the new count. The vector scans finish their rows with it.
inline int64_t scan_at_least_from(const float* s, int64_t j, int64_t n, uint32_t bound, uint64_t* out,
                                  int64_t count) {
  for (; j < n; ++j) {
    const uint32_t o = orderable(s[j]);
    out[count] = pack_bits(o, static_cast<uint32_t>(j));
    count += o >= bound;
  }
  return count;
}

// Compare-exchange without a branch (compiled to conditional moves): afterwards x >= y.
inline void compare_exchange(uint64_t& x, uint64_t& y) {
  const uint64_t a = x, b = y;
  x = a > b ? a : b;
  y = a > b ? b : a;
}

// Sorts a[0..n), n a power of two, in decreasing order with a bitonic network: n/2 * log2(n) *
// (log2(n) + 1) / 2 compare-exchanges and no data-dependent branch, where std::sort mispredicts
// about every other comparison of random keys.
void bitonic_sort(uint64_t* a, int64_t n) {
  for (int64_t size = 2; size <= n; size *= 2)
    for (int64_t stride = size / 2; stride > 0; stride /= 2)
      for (int64_t base = 0; base < n; base += 2 * stride)
        for (int64_t i = base; i < base + stride; ++i) {
          if ((i & size) == 0) compare_exchange(a[i], a[i + stride]);
          else compare_exchange(a[i + stride], a[i]);
        }
}

// a, b sorted decreasing (n each, a power of two) -> a holds the n largest of both, sorted.
void merge_top(uint64_t* a, const uint64_t* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] > b[n - 1 - i] ? a[i] : b[n - 1 - i];  // now bitonic
  for (int64_t stride = n / 2; stride > 0; stride /= 2)
    for (int64_t base = 0; base < n; base += 2 * stride)
      for (int64_t i = base; i < base + stride; ++i) compare_exchange(a[i], a[i + stride]);
}

// Keeps the k largest of keys[0..count) (count >= k) in keys[0..k), sorted in decreasing order.
// keys must have room for max(count, 2 * width) entries, width = the power of two >= k; the
// padding key 0 sorts below every real key.
void top_keys(uint64_t* keys, int64_t count, int64_t k, int64_t width) {
  if (count > 2 * width) {
    std::nth_element(keys, keys + width - 1, keys + count, std::greater<uint64_t>());
    count = width;
  }
  std::fill(keys + count, keys + 2 * width, uint64_t{0});
  bitonic_sort(keys, width);
  if (count > width) {
    bitonic_sort(keys + width, width);
    merge_top(keys, keys + width, width);
  }
}

// Top-k of s[0..n) as packed keys (value, index) in keys[0..k), decreasing.
// The scores are split into G = min(n, 4k) strided groups (group j holds s[j], s[j + G], ...). The
// top-k scores lie in the k groups with the largest maxima (a score outside them is beaten by k
// group maxima), and none is below the k-th largest group maximum. So only the groups whose maximum
// reaches that bound are scanned, against it: about 1.3k scores instead of n (more only with ties,
// which are all kept, so the smallest index wins a tie as in a full sort). Maxima are taken in the
// keys' order (orderable bits), so NaN ranks as in torch.topk. group_keys has room for G entries,
// keys for max(n, 2 * width) (see top_keys).
void topk_sorted(const float* s, int64_t n, int64_t k, int64_t width, uint32_t* group_max, uint64_t* group_keys,
                 uint64_t* keys) {
  const int64_t G = std::min(n, 4 * k);
  for (int64_t j = 0; j < G; ++j) group_max[j] = orderable(s[j]);
  for (int64_t i = G; i < n; i += G) {
    const int64_t m = std::min(G, n - i);
    for (int64_t j = 0; j < m; ++j) group_max[j] = std::max(group_max[j], orderable(s[i + j]));
  }
  for (int64_t j = 0; j < G; ++j) group_keys[j] = pack_bits(group_max[j], static_cast<uint32_t>(j));
  std::nth_element(group_keys, group_keys + k - 1, group_keys + G, std::greater<uint64_t>());
  const uint32_t bound = static_cast<uint32_t>(group_keys[k - 1] >> 32);  // its value part: ties with it stay in
  int64_t count = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (group_max[g] < bound) continue;
    for (int64_t j = g; j < n; j += G) {  // branch-free compaction
      const uint64_t key = pack(s[j], static_cast<uint32_t>(j));
      keys[count] = key;
      count += (key >> 32) >= bound;
    }
  }
  top_keys(keys, count, k, width);
}

// Per-row constants of a RowAdam update (see row_adam_).
struct AdamConstants {
  float one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias2_sqrt;
};

// A multiply-add rounded once where the CPU has FMA (this file is built with -march=native). Without it,
// std::fma is glibc's software routine, ~70x slower; the scalar path is then the only one the CPU can
// run (the vector paths need FMA), so rounding twice keeps every path on that machine in agreement.
#ifdef __FMA__
inline float madd(float a, float b, float c) { return std::fma(a, b, c); }
#else
inline float madd(float a, float b, float c) { return a * b + c; }
#endif

// One RowAdam update of a row of n floats: the arithmetic of pkmlm.training.optim.RowAdam._update_rows with
// each multiply-add that feeds a sum rounded once (as the vector paths do, pkm_adam_simd.h).
void adam_row_scalar(float* w, float* m, float* v, const float* g, int64_t n, const AdamConstants& c) {
  for (int64_t d = 0; d < n; ++d) {
    const float mean = madd(g[d] - m[d], c.one_minus_beta1, m[d]);
    const float var = madd(v[d], c.beta2, c.one_minus_beta2 * g[d] * g[d]);
    m[d] = mean;
    v[d] = var;
    w[d] = madd(mean / (std::sqrt(var) / c.bias2_sqrt + c.eps), -c.step_size, w[d]);
  }
}

// ---- vectorised selection: one copy of pkm_topk_simd.h per instruction set, chosen at run time ----
// Each copy is compiled for (at least) its own set, whatever -march says, and used only where
// __builtin_cpu_supports finds it; a test forces every path the CPU has (select_simd) and compares
// it with the scalar one.

#ifdef PKMLM_X86_SIMD
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace simd_avx2 {
using V = __m256i;
constexpr int kLanes = 4;
inline V vload(const uint64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void vstore(uint64_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline V greater(V a, V b) {  // unsigned a > b: AVX2 compares signed 64-bit integers only
  const V sign = _mm256_set1_epi64x(static_cast<long long>(0x8000000000000000ull));
  return _mm256_cmpgt_epi64(_mm256_xor_si256(a, sign), _mm256_xor_si256(b, sign));
}
inline V vmax(V a, V b) { return _mm256_blendv_epi8(b, a, greater(a, b)); }
inline V vmin(V a, V b) { return _mm256_blendv_epi8(a, b, greater(a, b)); }
inline V vswap(V x, int stride) { return stride == 2 ? _mm256_permute4x64_epi64(x, 0x4E) : _mm256_shuffle_epi32(x, 0x4E); }
inline V vselect(int bits, V a, V b) {
  const V mask = _mm256_set_epi64x(-static_cast<long long>((bits >> 3) & 1), -static_cast<long long>((bits >> 2) & 1),
                                   -static_cast<long long>((bits >> 1) & 1), -static_cast<long long>(bits & 1));
  return _mm256_blendv_epi8(b, a, mask);
}
inline V vreverse(V x) { return _mm256_permute4x64_epi64(x, 0x1B); }
// Packs (value, index) of every s[j] whose orderable bits are >= bound into out; returns the count.
inline int64_t scan_at_least(const float* s, int64_t n, uint32_t bound, uint64_t* out) {
  const __m256i b = _mm256_set1_epi32(static_cast<int>(bound)), sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  int64_t count = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j));
    const __m256i o = _mm256_xor_si256(x, _mm256_or_si256(_mm256_srai_epi32(x, 31), sign));
    unsigned m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(o, b), o)));
    while (m) {
      const int64_t i = j + __builtin_ctz(m);
      m &= m - 1;
      out[count++] = pack(s[i], static_cast<uint32_t>(i));
    }
  }
  return scan_at_least_from(s, j, n, bound, out, count);
}
#include "pkm_topk_simd.h"
using F = __m256;
constexpr int kFloatLanes = 8;
inline F fload(const float* p) { return _mm256_loadu_ps(p); }
inline void fstore(float* p, F x) { _mm256_storeu_ps(p, x); }
inline F fset1(float x) { return _mm256_set1_ps(x); }
inline F fadd(F a, F b) { return _mm256_add_ps(a, b); }
inline F fsub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F fdiv(F a, F b) { return _mm256_div_ps(a, b); }
inline F fsqrt(F a) { return _mm256_sqrt_ps(a); }
inline F ffma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
#include "pkm_adam_simd.h"
}  // namespace simd_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
#endif
namespace simd_avx512 {
using V = __m512i;
constexpr int kLanes = 8;
inline V vload(const uint64_t* p) { return _mm512_loadu_si512(p); }
inline void vstore(uint64_t* p, V v) { _mm512_storeu_si512(p, v); }
inline V vmax(V a, V b) { return _mm512_max_epu64(a, b); }
inline V vmin(V a, V b) { return _mm512_min_epu64(a, b); }
inline V vswap(V x, int stride) {
  return stride == 4 ? _mm512_shuffle_i64x2(x, x, 0x4E)
       : stride == 2 ? _mm512_permutex_epi64(x, 0x4E)
                     : _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(0x4E));
}
inline V vselect(int bits, V a, V b) { return _mm512_mask_blend_epi64(static_cast<__mmask8>(bits), b, a); }
inline V vreverse(V x) { return _mm512_permutexvar_epi64(_mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7), x); }
inline int64_t scan_at_least(const float* s, int64_t n, uint32_t bound, uint64_t* out) {
  const __m512i b = _mm512_set1_epi32(static_cast<int>(bound)), sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  int64_t count = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i x = _mm512_loadu_si512(s + j);
    const __m512i o = _mm512_xor_si512(x, _mm512_or_si512(_mm512_srai_epi32(x, 31), sign));
    unsigned m = _mm512_cmpge_epu32_mask(o, b);
    while (m) {
      const int64_t i = j + __builtin_ctz(m);
      m &= m - 1;
      out[count++] = pack(s[i], static_cast<uint32_t>(i));
    }
  }
  return scan_at_least_from(s, j, n, bound, out, count);
}
#include "pkm_topk_simd.h"
using F = __m512;
constexpr int kFloatLanes = 16;
inline F fload(const float* p) { return _mm512_loadu_ps(p); }
inline void fstore(float* p, F x) { _mm512_storeu_ps(p, x); }
inline F fset1(float x) { return _mm512_set1_ps(x); }
inline F fadd(F a, F b) { return _mm512_add_ps(a, b); }
inline F fsub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F fdiv(F a, F b) { return _mm512_div_ps(a, b); }
inline F fsqrt(F a) { return _mm512_sqrt_ps(a); }
inline F ffma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
#include "pkm_adam_simd.h"
}  // namespace simd_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PKMLM_X86_SIMD

// Vector paths (the top-k selection and RowAdam's row update): 0 scalar, 1 AVX2 (+FMA), 2 AVX-512 (x86
// only). The best one the CPU has by default.
const char* const kSimdNames[] = {"scalar", "avx2", "avx512"};

bool simd_supported(int path) {
#ifdef PKMLM_X86_SIMD
  if (path == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == 2) return simd_supported(1) && __builtin_cpu_supports("avx512f");
#endif
  return path == 0;
}

int best_simd() { return simd_supported(2) ? 2 : simd_supported(1) ? 1 : 0; }

std::atomic<int> g_simd{best_simd()};

// Top-k of a row of n scores into keys[0..k) (packed, decreasing) by the selected path.
inline void select_topk(int path, const float* s, int64_t n, int64_t k, int64_t width, uint32_t* group_max,
                        uint64_t* group_keys, uint64_t* keys) {
#ifdef PKMLM_X86_SIMD
  uint32_t* gm = reinterpret_cast<uint32_t*>(group_keys);  // room: 4 * k >= the 4 * 16 * kLanes used
  if (path == 2 && simd_avx512::registers_for(k)) return simd_avx512::topk_row(s, n, k, gm, keys);
  if (path == 1 && simd_avx2::registers_for(k)) return simd_avx2::topk_row(s, n, k, gm, keys);
#endif
  topk_sorted(s, n, k, width, group_max, group_keys, keys);
}

// The k largest of keys[0..count) into keys[0..k), decreasing, by the selected path.
inline void select_top_keys(int path, uint64_t* keys, int64_t count, int64_t k, int64_t width) {
#ifdef PKMLM_X86_SIMD
  if (path == 2 && simd_avx512::registers_for(k)) return simd_avx512::top_keys(keys, count, k);
  if (path == 1 && simd_avx2::registers_for(k)) return simd_avx2::top_keys(keys, count, k);
#endif
  top_keys(keys, count, k, width);
}

std::vector<std::string> simd_paths() {
  std::vector<std::string> out;
  for (int p = 0; p < 3; ++p)
    if (simd_supported(p)) out.push_back(kSimdNames[p]);
  return out;
}

// Selects the path for later calls ("auto": the best this CPU has; "": keep it); returns the previous one.
std::string select_simd(const std::string& name) {
  if (name.empty()) return kSimdNames[g_simd.load()];
  int path = name == "auto" ? best_simd() : -1;
  for (int p = 0; p < 3 && path < 0; ++p)
    if (name == kSimdNames[p]) path = p;
  TORCH_CHECK(path >= 0, "unknown selection path '", name, "': use auto, scalar, avx2 or avx512");
  TORCH_CHECK(simd_supported(path), "this CPU cannot run the '", name, "' selection path");
  return kSimdNames[g_simd.exchange(path)];
}

void check_float_contiguous(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              name, " must be a contiguous float32 CPU tensor with ", dim, " dimensions");
}

// One pass over the ids before the unchecked hot loops: an id out of [0, size) would read or write
// outside a buffer.
void check_ids(const Tensor& ids, int64_t size, const char* name) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(), name,
              " must be a contiguous int64 CPU tensor");
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t n = ids.numel();
  uint64_t bad = 0;  // as unsigned, a negative id is above every size
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(p[i]) >= static_cast<uint64_t>(size);
  if (bad) {
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < n; ++i) lo = std::min(lo, p[i]), hi = std::max(hi, p[i]);
    TORCH_CHECK(false, name, " must lie in [0, ", size, "), got values in [", lo, ", ", hi, "]");
  }
}

// Exact top-knn slots of queries q (N, H, 2, half) against sub-keys (H, 2, K, half).
// Returns scores (N, H, knn) float32, slots (N, H, knn) int64 = i1 * K + i2, and, if with_subkeys,
// each half's top-knn sub-key ids (N, H, 2, knn) int64 (else an empty tensor).
std::tuple<Tensor, Tensor, Tensor> pkm_lookup(const Tensor& q, const Tensor& keys, int64_t knn, bool with_subkeys) {
  check_float_contiguous(q, "q", 4);
  check_float_contiguous(keys, "keys", 4);
  const int64_t N = q.size(0), H = q.size(1), half = q.size(3), K = keys.size(2);
  TORCH_CHECK(q.size(2) == 2 && keys.size(0) == H && keys.size(1) == 2 && keys.size(3) == half,
              "q (N, H, 2, half) and keys (H, 2, K, half) do not match");
  TORCH_CHECK(knn >= 1 && knn <= K, "knn must be in [1, n_keys]");
  const Tensor keys_t = keys.transpose(2, 3).contiguous();  // (H, 2, half, K): right operand of mm
  Tensor scores = at::empty({N, H, knn}, q.options());
  Tensor slots = at::empty({N, H, knn}, q.options().dtype(at::kLong));
  Tensor subkeys = at::empty({with_subkeys ? N : 0, H, 2, knn}, q.options().dtype(at::kLong));
  // Rank pairs (a, b) that can reach the top-knn of the sums: (a + 1) * (b + 1) <= knn.
  std::vector<int32_t> pair_a, pair_b;
  for (int32_t a = 0; a < knn; ++a)
    for (int32_t b = 0; (a + 1) * (b + 1) <= knn; ++b) pair_a.push_back(a), pair_b.push_back(b);
  const int64_t P = static_cast<int64_t>(pair_a.size());
  const int simd = g_simd.load();

  float* out_scores = scores.data_ptr<float>();
  int64_t* out_slots = slots.data_ptr<int64_t>();
  int64_t* out_sub = with_subkeys ? subkeys.data_ptr<int64_t>() : nullptr;
  // Tokens per block: their (H, 2, block, K) half scores (2 MB) stay in cache, and each matmul is
  // large enough to run near peak (small blocks cost more in per-call overhead than they save).
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(256, (1 << 19) / std::max<int64_t>(1, H * 2 * K)));
  const int64_t n_blocks = (N + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
    Tensor buf = at::empty({H, 2, block, K}, q.options());
    std::vector<uint32_t> group_max(4 * knn);
    std::vector<float> v(2 * knn);
    std::vector<uint64_t> group_keys(std::max<int64_t>(4 * knn, 512));  // SIMD paths: 4 x 128 uint32
    std::vector<int32_t> id(2 * knn);
    int64_t width = 1;
    while (width < knn) width *= 2;
    std::vector<uint64_t> keys_buf(std::max({K, P, 2 * width, int64_t{512}}) + 128);  // + SIMD padding
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t n0 = blk * block, nb = std::min(block, N - n0);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t p = 0; p < 2; ++p) {
          Tensor out = buf[h][p].narrow(0, 0, nb);
          at::mm_out(out, q.narrow(0, n0, nb).select(1, h).select(1, p), keys_t[h][p]);
        }
      const float* bp = buf.data_ptr<float>();
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t n = n0 + i;
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t p = 0; p < 2; ++p) {
            const float* row = bp + ((h * 2 + p) * block + i) * K;
            select_topk(simd, row, K, knn, width, group_max.data(), group_keys.data(), keys_buf.data());
            for (int64_t r = 0; r < knn; ++r) {
              id[p * knn + r] = static_cast<int32_t>(unpack_id(keys_buf[r]));
              v[p * knn + r] = row[id[p * knn + r]];
            }
          }
          // The knn pairs (0, b) all score at least v[0] + v[knn + knn - 1] (and likewise (a, 0)):
          // a lower bound of the knn-th best sum; pairs below it are not ranked.
          const float b0 = v[0] + v[2 * knn - 1], b1 = v[knn - 1] + v[knn];
          const float bound = b0 > b1 ? b0 : b1;
          int64_t count = 0;
          for (int64_t c = 0; c < P; ++c) {
            const float sum = v[pair_a[c]] + v[knn + pair_b[c]];
            keys_buf[count] = pack(sum, static_cast<uint32_t>(c));
            count += sum >= bound;
          }
          if (count < knn) {  // NaN scores
            for (int64_t c = 0; c < P; ++c) keys_buf[c] = pack(v[pair_a[c]] + v[knn + pair_b[c]], static_cast<uint32_t>(c));
            count = P;
          }
          select_top_keys(simd, keys_buf.data(), count, knn, width);
          const int64_t o = (n * H + h) * knn;
          for (int64_t r = 0; r < knn; ++r) {
            const uint32_t c = unpack_id(keys_buf[r]);
            out_scores[o + r] = v[pair_a[c]] + v[knn + pair_b[c]];
            out_slots[o + r] = static_cast<int64_t>(id[pair_a[c]]) * K + id[knn + pair_b[c]];
          }
          if (out_sub)
            for (int64_t r = 0; r < 2 * knn; ++r) out_sub[o * 2 + r] = id[r];
        }
      }
    }
  });
  return {scores, slots, subkeys};
}

// Gradients of pkm_lookup's scores: score = q[:, h, 0] . keys[h, 0, i1] + q[:, h, 1] . keys[h, 1, i2].
// Only the selected sub-keys receive gradient, so this costs O(N * H * knn * half), not O(N * H * K * half).
std::tuple<Tensor, Tensor> pkm_lookup_backward(const Tensor& grad_scores, const Tensor& slots, const Tensor& q,
                                               const Tensor& keys) {
  check_float_contiguous(grad_scores, "grad_scores", 3);
  check_float_contiguous(q, "q", 4);
  check_float_contiguous(keys, "keys", 4);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.sizes() == grad_scores.sizes(),
              "slots must be a contiguous int64 tensor shaped like grad_scores");
  const int64_t N = q.size(0), H = q.size(1), half = q.size(3), K = keys.size(2), knn = slots.size(2);
  TORCH_CHECK(q.size(2) == 2 && keys.size(0) == H && keys.size(1) == 2 && keys.size(3) == half,
              "q (N, H, 2, half) and keys (H, 2, K, half) do not match");
  TORCH_CHECK(grad_scores.size(0) == N && grad_scores.size(1) == H,
              "grad_scores and slots must be (N, H, knn) for q (N, H, 2, half), got ", grad_scores.sizes(),
              " for q ", q.sizes());
  check_ids(slots, K * K, "slots");
  Tensor grad_q = at::zeros_like(q);
  Tensor grad_keys = at::zeros_like(keys);
  const float* g = grad_scores.data_ptr<float>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  float* gq = grad_q.data_ptr<float>();
  float* gk = grad_keys.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t r = 0; r < knn; ++r) {
          const int64_t o = (n * H + h) * knn + r;
          const float w = g[o];
          const int64_t i1 = sl[o] / K, i2 = sl[o] % K;
          float* d0 = gq + ((n * H + h) * 2 + 0) * half;
          float* d1 = d0 + half;
          const float* k0 = kp + ((h * 2 + 0) * K + i1) * half;
          const float* k1 = kp + ((h * 2 + 1) * K + i2) * half;
          for (int64_t d = 0; d < half; ++d) d0[d] += w * k0[d];
          for (int64_t d = 0; d < half; ++d) d1[d] += w * k1[d];
        }
  });
  // Each (head, half) owns its slice of grad_keys: no two threads write the same row.
  at::parallel_for(0, H * 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t hp = first; hp < last; ++hp) {
      const int64_t h = hp / 2, p = hp % 2;
      for (int64_t n = 0; n < N; ++n) {
        const float* src = qp + ((n * H + h) * 2 + p) * half;
        for (int64_t r = 0; r < knn; ++r) {
          const int64_t o = (n * H + h) * knn + r;
          const int64_t i = p == 0 ? sl[o] / K : sl[o] % K;
          const float w = g[o];
          float* dst = gk + (hp * K + i) * half;
          for (int64_t d = 0; d < half; ++d) dst[d] += w * src[d];
        }
      }
    }
  });
  return {grad_q, grad_keys};
}

// x . y over n floats (one summation order for bag_weights_backward and sparse_read_backward).
inline float dot(const float* x, const float* y, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += x[d] * y[d];
  return acc;
}

// d(out[n]) / d(weights[n, r]) where out[n] = sum_r weights[n, r] * table[slots[n, r]]:
// grad_weights[n, r] = grad_out[n] . table[slots[n, r]].
Tensor bag_weights_backward(const Tensor& grad_out, const Tensor& table, const Tensor& slots) {
  check_float_contiguous(grad_out, "grad_out", 2);
  check_float_contiguous(table, "table", 2);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2 &&
                  slots.size(0) == grad_out.size(0),
              "slots must be a contiguous int64 (N, reads) tensor");
  const int64_t N = slots.size(0), R = slots.size(1), D = table.size(1);
  TORCH_CHECK(grad_out.size(1) == D, "grad_out and table rows differ in size");
  check_ids(slots, table.size(0), "slots");
  Tensor result = at::empty({N, R}, grad_out.options());
  const float* go = grad_out.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  float* out = result.data_ptr<float>();
  constexpr int64_t kAhead = 4;  // rows prefetched ahead: the reads are random over a large table
  at::parallel_for(0, N, 8, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      const float* x = go + n * D;
      for (int64_t r = 0; r < R; ++r) {
        if (r + kAhead < R) {
          const char* ahead = reinterpret_cast<const char*>(tp + sl[n * R + r + kAhead] * D);
          for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(ahead + b);
        }
        out[n * R + r] = dot(x, tp + sl[n * R + r] * D, D);
      }
    }
  });
  return result;
}

// Writes a finished row of n floats to dst without reading dst's lines first (streaming stores, where the
// row is 32-byte aligned and the CPU has AVX): the row-sparse gradient is written once and read later.
// 256-bit stores: 512-bit ones measured no faster.
inline void stream_row(float* dst, const float* src, int64_t n) {
#if defined(PKMLM_X86_SIMD) && defined(__AVX__)
  if (reinterpret_cast<uintptr_t>(dst) % 32 == 0 && n % 8 == 0) {
    for (int64_t d = 0; d < n; d += 8) _mm256_stream_ps(dst + d, _mm256_loadu_ps(src + d));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(float));
}

// Orders this thread's streaming stores before what follows the parallel region.
inline void stream_fence() {
#if defined(PKMLM_X86_SIMD) && defined(__AVX__)
  _mm_sfence();
#endif
}

// The value table's gradient of out[n] = sum_r weights[n, r] * table[slots[n, r]] (pkmlm.memory.sparse.row_sparse_grad):
// the distinct slots read, increasing (U,) int64, and one summed gradient row each (U, D): the sum of
// weights[n, r] * grad_out[n] over the reads (n, r) of that slot, in increasing n * R + r.
// The reads are sorted by a counting sort on the slots' high bits (stable, per thread chunk) and a sort of each
// bucket's few (slot, read) keys; each bucket's rows are then summed straight into the output.
// With a table (sparse_read_backward), the same pass also gives the weights' gradient,
// grad_weights[n, r] = grad_out[n] . table[slots[n, r]] (as bag_weights_backward), reading each table row once
// and in slot order.
std::tuple<Tensor, Tensor, Tensor> sorted_read_grads(const Tensor& slots, const Tensor& weights,
                                                     const Tensor& grad_out, int64_t num_rows, const Tensor* table) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2,
              "slots must be a contiguous int64 (N, reads) tensor");
  check_float_contiguous(weights, "weights", 2);
  check_float_contiguous(grad_out, "grad_out", 2);
  const int64_t N = slots.size(0), R = slots.size(1), D = grad_out.size(1), E = N * R;
  TORCH_CHECK(weights.size(0) == N && weights.size(1) == R && grad_out.size(0) == N,
              "slots, weights and grad_out do not match");
  TORCH_CHECK(num_rows > 0 && num_rows <= (int64_t{1} << 31) && E < (int64_t{1} << 32),
              "row_sparse_grad: at most 2**31 rows and 2**32 reads");
  check_ids(slots, num_rows, "slots");
  int bits = 0;  // slots fit in `bits` bits
  while ((int64_t{1} << bits) < num_rows) ++bits;
  int bucket_bits = 0;  // about 32 reads per bucket
  while (bucket_bits < bits && (int64_t{32} << (bucket_bits + 1)) <= E) ++bucket_bits;
  const int shift = bits - bucket_bits;
  const int64_t B = int64_t{1} << bucket_bits;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E / 16384));
  const int64_t chunk = (E + chunks - 1) / chunks;
  const int64_t* sl = slots.data_ptr<int64_t>();
  // Counting sort into buckets: counts per (chunk, bucket), then bucket-major offsets, so each bucket
  // holds its reads in increasing order.
  std::vector<int64_t> offset(chunks * B, 0), bucket_start(B + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int64_t* count = offset.data() + c * B;
      for (int64_t e = c * chunk, end = std::min(E, e + chunk); e < end; ++e) ++count[sl[e] >> shift];
    }
  });
  int64_t running = 0;
  for (int64_t b = 0; b < B; ++b) {
    bucket_start[b] = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = offset[c * B + b];
      offset[c * B + b] = running;
      running += n;
    }
  }
  bucket_start[B] = running;
  std::vector<uint64_t> keys(E);  // (slot << 32) | read
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int64_t* next = offset.data() + c * B;
      for (int64_t e = c * chunk, end = std::min(E, e + chunk); e < end; ++e)
        keys[next[sl[e] >> shift]++] = (static_cast<uint64_t>(sl[e]) << 32) | static_cast<uint64_t>(e);
    }
  });
  std::vector<int64_t> row_start(B + 1, 0);  // distinct slots before each bucket
  at::parallel_for(0, B, 64, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      uint64_t* k = keys.data() + bucket_start[b];
      const int64_t n = bucket_start[b + 1] - bucket_start[b];
      std::sort(k, k + n);
      int64_t distinct = 0;
      for (int64_t i = 0; i < n; ++i) distinct += i == 0 || (k[i] >> 32) != (k[i - 1] >> 32);
      row_start[b + 1] = distinct;
    }
  });
  for (int64_t b = 0; b < B; ++b) row_start[b + 1] += row_start[b];
  const int64_t U = row_start[B];
  Tensor rows = at::empty({U}, slots.options());
  Tensor grads = at::empty({U, D}, grad_out.options());
  int64_t* rp = rows.data_ptr<int64_t>();
  float* gp = grads.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  Tensor grad_weights = table ? at::empty({N, R}, grad_out.options()) : Tensor();
  const float* tp = table ? table->data_ptr<float>() : nullptr;
  float* gw = table ? grad_weights.data_ptr<float>() : nullptr;
  constexpr int64_t kAhead = 4;  // table rows prefetched ahead, in read order
  at::parallel_for(0, B, 64, [&](int64_t first, int64_t last) {
    std::vector<float> sum(D);  // the row being summed stays in cache; the output is only written
    float* acc = sum.data();
    for (int64_t b = first; b < last; ++b) {
      int64_t u = row_start[b];
      const int64_t end = bucket_start[b + 1];
      for (int64_t i = bucket_start[b]; i < end;) {
        const uint64_t slot = keys[i] >> 32;
        const int64_t first_read = i;
        for (; i < end && keys[i] >> 32 == slot; ++i) {
          const int64_t e = static_cast<int64_t>(keys[i] & 0xFFFFFFFFu);
          const float w = wp[e];
          const float* x = go + (e / R) * D;
          if (tp) {
            if (i + kAhead < end) {
              const char* ahead = reinterpret_cast<const char*>(tp + static_cast<int64_t>(keys[i + kAhead] >> 32) * D);
              for (int64_t off = 0; off < D * 4; off += 64) __builtin_prefetch(ahead + off);
            }
            gw[e] = dot(x, tp + static_cast<int64_t>(slot) * D, D);
          }
          if (i == first_read) {
            for (int64_t d = 0; d < D; ++d) acc[d] = w * x[d];
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += w * x[d];
          }
        }
        rp[u] = static_cast<int64_t>(slot);
        stream_row(gp + u * D, acc, D);
        ++u;
      }
    }
    stream_fence();
  });
  return {rows, grads, grad_weights};
}

std::tuple<Tensor, Tensor> row_sparse_grad(const Tensor& slots, const Tensor& weights, const Tensor& grad_out,
                                           int64_t num_rows) {
  auto [rows, grads, unused] = sorted_read_grads(slots, weights, grad_out, num_rows, nullptr);
  return {rows, grads};
}

// Both gradients of out[n] = sum_r weights[n, r] * table[slots[n, r]] in one pass (sorted_read_grads):
// the table's row-sparse one (rows, row gradients) and the weights' (N, R).
std::tuple<Tensor, Tensor, Tensor> sparse_read_backward(const Tensor& grad_out, const Tensor& table, const Tensor& slots,
                                                        const Tensor& weights) {
  check_float_contiguous(table, "table", 2);
  TORCH_CHECK(table.size(1) == grad_out.size(-1), "grad_out and table rows differ in size");
  return sorted_read_grads(slots, weights, grad_out, table.size(0), &table);
}

using AdamRow = void (*)(float*, float*, float*, const float*, int64_t, const AdamConstants&);

AdamRow adam_row_for(int path) {
#ifdef PKMLM_X86_SIMD
  if (path == 2) return simd_avx512::adam_row;
  if (path == 1) return simd_avx2::adam_row;
#endif
  return adam_row_scalar;
}

// One lazy Adam step of the unique `rows` of weight (S, D): moments (S, 2, D) hold Adam's first and
// second moments, step (S,) each row's step count; grads (R, D) the rows' summed gradients.
// Same arithmetic as pkmlm.training.optim.RowAdam's torch path, in one read and one write of each row, the
// row's arithmetic by the selected vector path (select_simd).
void row_adam_(Tensor weight, Tensor moments, Tensor step, const Tensor& rows, const Tensor& grads, double lr,
               double beta1, double beta2, double eps) {
  check_float_contiguous(weight, "weight", 2);
  check_float_contiguous(moments, "moments", 3);
  check_float_contiguous(grads, "grads", 2);
  TORCH_CHECK(step.scalar_type() == at::kLong && step.is_contiguous(), "step must be contiguous int64");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1, "rows must be int64 (R,)");
  const int64_t R = rows.size(0), D = weight.size(1);
  TORCH_CHECK(grads.size(0) == R && grads.size(1) == D && moments.size(0) == weight.size(0) &&
                  moments.size(1) == 2 && moments.size(2) == D && step.numel() == weight.size(0),
              "weight, moments, step, rows and grads do not match");
  check_ids(rows, weight.size(0), "rows");
  float* w = weight.data_ptr<float>();
  float* m = moments.data_ptr<float>();
  int64_t* st = step.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const float* gp = grads.data_ptr<float>();
  const AdamRow adam_row = adam_row_for(g_simd.load());
  AdamConstants c{static_cast<float>(1 - beta1), static_cast<float>(beta2), static_cast<float>(1 - beta2),
                  static_cast<float>(eps), 0.f, 0.f};
  at::parallel_for(0, R, 64, [&](int64_t first, int64_t last) {
    AdamConstants row = c;
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = rp[i];
      if (i + 1 < last) {  // the next row's weights and moments: sorted but far apart
        const char* nw = reinterpret_cast<const char*>(w + rp[i + 1] * D);
        const char* nm = reinterpret_cast<const char*>(m + rp[i + 1] * 2 * D);
        for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(nw + b, 1);
        for (int64_t b = 0; b < D * 8; b += 64) __builtin_prefetch(nm + b, 1);
      }
      const int64_t t = ++st[r];
      row.step_size = static_cast<float>(lr / (1 - std::pow(beta1, static_cast<double>(t))));
      row.bias2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, static_cast<double>(t))));
      float* mr = m + r * 2 * D;
      adam_row(w + r * D, mr, mr + D, gp + i * D, D, row);
    }
  });
}

}  // namespace

TORCH_LIBRARY(pkmlm, m) {
  m.def("pkm_lookup(Tensor q, Tensor keys, int knn, bool with_subkeys) -> (Tensor, Tensor, Tensor)");
  m.def("pkm_lookup_backward(Tensor grad_scores, Tensor slots, Tensor q, Tensor keys) -> (Tensor, Tensor)");
  m.def("bag_weights_backward(Tensor grad_out, Tensor table, Tensor slots) -> Tensor");
  m.def("row_sparse_grad(Tensor slots, Tensor weights, Tensor grad_out, int num_rows) -> (Tensor, Tensor)");
  m.def("sparse_read_backward(Tensor grad_out, Tensor table, Tensor slots, Tensor weights) -> (Tensor, Tensor, Tensor)");
  m.def("simd_paths() -> str[]", &simd_paths);  // no tensor arguments: one kernel for every device
  m.def("select_simd(str name) -> str", &select_simd);
  m.def("row_adam_(Tensor(a!) weight, Tensor(b!) moments, Tensor(c!) step, Tensor rows, Tensor grads, float lr, "
        "float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(pkmlm, CPU, m) {
  m.impl("pkm_lookup", &pkm_lookup);
  m.impl("pkm_lookup_backward", &pkm_lookup_backward);
  m.impl("bag_weights_backward", &bag_weights_backward);
  m.impl("row_sparse_grad", &row_sparse_grad);
  m.impl("sparse_read_backward", &sparse_read_backward);
  m.impl("row_adam_", &row_adam_);
}
