// Vectorised top-k selection, included once per instruction set by pkm_cpu.cpp, inside a namespace
// that defines V (a vector of kLanes uint64 keys) and vload, vstore, vmax, vmin (unsigned), vswap
// (exchange lanes `stride` apart), vselect (lanes whose bit is set take the first operand), vreverse
// and scan_at_least (see pkm_cpu.cpp; orderable() is the scalar code's). Compiled under that set's target pragma: no std:: or ATen
// templates here, since their instantiations would be shared with (and could replace) the
// baseline build's.
//
// Keys are the scalar path's packed (value, index) integers, all distinct, so every path returns
// the same k keys in the same order.

// Lanes [base, base + kLanes) of a bitonic stage (size, stride): bit j set where lane j keeps the max.
inline int lane_bits(int size, int stride, int base) {
  int bits = 0;
  for (int j = 0; j < kLanes; ++j) {
    const bool lower = (j & stride) == 0, descending = ((base + j) & size) == 0;
    bits |= (lower == descending) << j;
  }
  return bits;
}

// One compare-exchange stage of a bitonic network over NV registers (NV * kLanes keys).
template <int NV>
inline void exchange_stage(V* r, int size, int stride) {
  if (stride >= kLanes) {
    const int sv = stride / kLanes;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (v & sv) continue;
      const V hi = vmax(r[v], r[v + sv]), lo = vmin(r[v], r[v + sv]);
      const bool descending = ((v * kLanes) & size) == 0;
      r[v] = descending ? hi : lo;
      r[v + sv] = descending ? lo : hi;
    }
  } else {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const V x = r[v], p = vswap(x, stride);
      r[v] = vselect(lane_bits(size, stride, v * kLanes), vmax(x, p), vmin(x, p));
    }
  }
}

// Sorts the NV * kLanes keys of r in decreasing order.
template <int NV>
inline void sort_regs(V* r) {
#pragma GCC unroll 16
  for (int size = 2; size <= NV * kLanes; size *= 2) {
#pragma GCC unroll 16
    for (int stride = size / 2; stride > 0; stride /= 2) exchange_stage<NV>(r, size, stride);
  }
}

// top, x sorted decreasing -> top holds the largest half of both, sorted decreasing.
template <int NV>
inline void merge_top_regs(V* top, const V* x) {
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) top[v] = vmax(top[v], vreverse(x[NV - 1 - v]));  // bitonic now
#pragma GCC unroll 16
  for (int stride = NV * kLanes / 2; stride > 0; stride /= 2) exchange_stage<NV>(top, 2 * NV * kLanes, stride);
}

// The k largest of keys[0..count) into keys[0..k), decreasing (k <= NV * kLanes). keys has room for
// count rounded up to a multiple of NV * kLanes (at least that many) entries; the padding key 0
// sorts below every real key.
template <int NV>
void top_keys_regs(uint64_t* keys, int64_t count) {
  constexpr int W = NV * kLanes;
  const int64_t padded = count <= W ? W : (count + W - 1) / W * W;
  for (int64_t i = count; i < padded; ++i) keys[i] = 0;
  V top[NV], x[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) top[v] = vload(keys + v * kLanes);
  sort_regs<NV>(top);
  for (int64_t c = W; c < padded; c += W) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) x[v] = vload(keys + c + v * kLanes);
    sort_regs<NV>(x);
    merge_top_regs<NV>(top, x);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) vstore(keys + v * kLanes, top[v]);
}

// Registers per network for k, or 0 when k is too large for this path (the caller falls back).
inline int registers_for(int64_t k) {
  int nv = 1;
  while (nv * kLanes < k) nv *= 2;
  return nv <= 16 ? nv : 0;
}

// As top_keys_regs with NV = registers_for(k) > 0. Room: count rounded up to 16 * kLanes.
inline void top_keys(uint64_t* keys, int64_t count, int64_t k) {
  switch (registers_for(k)) {
    case 1: return top_keys_regs<1>(keys, count);
    case 2: return top_keys_regs<2>(keys, count);
    case 4: return top_keys_regs<4>(keys, count);
    case 8: return top_keys_regs<8>(keys, count);
    default: return top_keys_regs<16>(keys, count);
  }
}

// Top-k of s[0..n) as packed keys in keys[0..k), decreasing (registers_for(k) > 0). Short rows are
// sorted whole. Longer ones are split into G strided groups (group j: s[j], s[j + G], ...): the k-th
// largest group maximum bounds the k-th largest score from below, so only the scores at or above it
// (about 1.3k for random scores) are ranked. group_max has room for 4 * 16 * kLanes entries, keys
// for n + 16 * kLanes.
inline void topk_row(const float* s, int64_t n, int64_t k, uint32_t* group_max, uint64_t* keys) {
  const int64_t W = registers_for(k) * kLanes, G = 4 * W;
  if (n <= 2 * G) {
    for (int64_t j = 0; j < n; ++j)
      keys[j] = pack(s[j], static_cast<uint32_t>(j));
    return top_keys(keys, n, k);
  }
  for (int64_t j = 0; j < G; ++j) group_max[j] = orderable(s[j]);
  for (int64_t i = G; i < n; i += G) {
    const int64_t m = n - i < G ? n - i : G;
    for (int64_t j = 0; j < m; ++j) {
      const uint32_t o = orderable(s[i + j]);
      group_max[j] = o > group_max[j] ? o : group_max[j];
    }
  }
  for (int64_t j = 0; j < G; ++j)
    keys[j] = pack_bits(group_max[j], static_cast<uint32_t>(j));
  top_keys(keys, G, k);
  const uint32_t bound = static_cast<uint32_t>(keys[k - 1] >> 32);
  top_keys(keys, scan_at_least(s, n, bound, keys), k);
}
