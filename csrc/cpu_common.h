#pragma once
// What the CPU kernels (lora_cpu.cpp, linear_cpu.cpp) share: run-time CPU dispatch, bfloat16 storage
// and the dtype switch.

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// One binary for every x86-64 CPU: the hot kernels are compiled for x86-64-v4 (AVX-512), v3 (AVX2 +
// FMA) and the baseline, and the loader picks the best one the CPU supports (GCC 12+; other
// compilers build the baseline only).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SWITCHCIT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SWITCHCIT_MULTIVERSION
#endif
// Block helpers must be inlined into the multiversioned kernels to be compiled for their target.
#define SWITCHCIT_INLINE inline __attribute__((always_inline))

namespace switchcit {

// bfloat16 storage: the upper 16 bits of a float32.
using BFloat16 = uint16_t;

SWITCHCIT_INLINE float to_float(float value) { return value; }

SWITCHCIT_INLINE float to_float(BFloat16 value) {
  const uint32_t bits = uint32_t(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

SWITCHCIT_INLINE void store(float& dst, float value) { dst = value; }

SWITCHCIT_INLINE void store(BFloat16& dst, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  // Round to nearest even; a NaN is kept a (quiet) NaN rather than rounded into infinity.
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  bits = is_nan ? (bits | 0x00400000u) : bits + 0x7fffu + ((bits >> 16) & 1u);
  dst = uint16_t(bits >> 16);
}

// Calls fn(T()) with T the storage type named by dtype.
template <typename Fn>
void with_storage_type(const std::string& dtype, const Fn& fn) {
  if (dtype == "float32")
    fn(float());
  else if (dtype == "bfloat16")
    fn(BFloat16());
  else
    throw std::invalid_argument("dtype must be 'float32' or 'bfloat16', got '" + dtype + "'");
}

}  // namespace switchcit
