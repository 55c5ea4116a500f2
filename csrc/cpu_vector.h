#pragma once
// 8-lane float32 vectors (one AVX2 register; two SSE registers in the baseline clone) for the CPU kernels,
// GCC vector extensions: loads of float32 and bfloat16, partial loads, and lane sums in one fixed tree.

#include <cstdint>
#include <cstring>

#include "cpu_common.h"

// Vectors pass only between always-inlined helpers, never through a call: GCC's note on the ABI of
// 32-byte vectors in the baseline clone (no AVX) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace switchcit {

constexpr int kLanes = 8;  // one AVX2 vector of float32
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));
using Vec4 = float __attribute__((vector_size(4 * sizeof(float))));

SWITCHCIT_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SWITCHCIT_INLINE Vec load(const BFloat16* p) {
  using Half = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  using Bits = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  Half half;
  std::memcpy(&half, p, sizeof half);
  const Bits bits = __builtin_convertvector(half, Bits) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The first `count` < kLanes values at p, zeros after them: the last step over H is a vector step like
// the others (a scalar tail would be compiled differently in different tiles).
template <typename T>
SWITCHCIT_INLINE Vec load_part(const T* p, int64_t count) {
  T part[kLanes] = {};
  std::memcpy(part, p, count * sizeof(T));
  return load(part);
}

SWITCHCIT_INLINE Vec4 low_half(const Vec& v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
SWITCHCIT_INLINE Vec4 high_half(const Vec& v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }

// {Σ a, Σ b, Σ c, Σ d} over the lanes, each in the same tree: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
SWITCHCIT_INLINE Vec4 horizontal_sums(const Vec& a, const Vec& b, const Vec& c, const Vec& d) {
  const Vec4 a4 = low_half(a) + high_half(a), b4 = low_half(b) + high_half(b);
  const Vec4 c4 = low_half(c) + high_half(c), d4 = low_half(d) + high_half(d);
  // {a0 + a2, b0 + b2, a1 + a3, b1 + b3} and the same of c and d.
  const Vec4 ab = __builtin_shufflevector(a4, b4, 0, 4, 1, 5) + __builtin_shufflevector(a4, b4, 2, 6, 3, 7);
  const Vec4 cd = __builtin_shufflevector(c4, d4, 0, 4, 1, 5) + __builtin_shufflevector(c4, d4, 2, 6, 3, 7);
  return __builtin_shufflevector(ab, cd, 0, 1, 4, 5) + __builtin_shufflevector(ab, cd, 2, 3, 6, 7);
}

// sums[k] = Σ over the lanes of vectors[k], k < kCount, four at a time by horizontal_sums (the same tree
// for every vector, so a sum does not depend on its place in the list).
template <int kCount>
SWITCHCIT_INLINE void horizontal_sums(const Vec (&vectors)[kCount], float (&sums)[kCount]) {
  for (int k = 0; k < kCount; k += 4) {
    const Vec zero = {};
    const Vec4 four = horizontal_sums(vectors[k], k + 1 < kCount ? vectors[k + 1] : zero,
                                      k + 2 < kCount ? vectors[k + 2] : zero, k + 3 < kCount ? vectors[k + 3] : zero);
    for (int i = 0; i < 4 && k + i < kCount; ++i) sums[k + i] = four[i];
  }
}

SWITCHCIT_INLINE void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

}  // namespace switchcit
