#pragma once
// CPU kernels for the ops of a decoder layer besides its linear layers — RMSNorm (with the residual add
// before it), rotary embedding, and a decode step's attention over a slot KV cache — on raw buffers as
// linear_cpu.h: addresses from tensor.data_ptr() (0 = absent), row-major and contiguous unless a stride
// is given, validated by the Python caller (switchcit/ops/cpp.py). dtype ("float32" | "bfloat16") is the
// storage type of every buffer but positions; the arithmetic is float32.

#include <cstdint>
#include <string>

namespace switchcit {

// s = x + residual, also written to residual_out (residual = 0: s = x, nothing written); then
// out = weight · (s · rsqrt(mean(s²) + eps)), rounded to the storage type after the normalisation and
// again after the weight, as transformers' LlamaRMSNorm does. x, residual, residual_out, out:
// [rows, hidden]; weight [hidden]. out may be x; residual_out may be x or residual.
void rms_norm_forward(std::uintptr_t out, std::uintptr_t residual_out, std::uintptr_t x, std::uintptr_t residual,
                      std::uintptr_t weight, double eps, const std::string& dtype, int64_t rows, int64_t hidden,
                      int num_threads);

// In place: x ← x · cos + rotate_half(x) · sin for every head of q [T, q_heads, D] and k [T, k_heads, D]
// (token t's heads at t · q_stride / t · k_stride elements, D apart), rotate_half(x) = (−x[D/2:], x[:D/2]),
// cos and sin [T, D]; each product and the sum rounded to the storage type, as transformers does.
void rotary_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t cos, std::uintptr_t sin,
                    const std::string& dtype, int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                    int64_t q_stride, int64_t k_stride, int num_threads);

// One query token per slot: out[i, h] = Σ_p softmax_p(scaling · q[i, h] · K[i, h / g, p]) V[i, h / g, p]
// over the positions p ≤ positions[i] (int64) of slot i, g = heads / kv_heads. q, out [n, heads, D];
// key_cache, value_cache [slots ≥ n, kv_heads, max_positions, D].
void decode_attention_forward(std::uintptr_t out, std::uintptr_t q, std::uintptr_t key_cache,
                              std::uintptr_t value_cache, std::uintptr_t positions, const std::string& dtype,
                              int64_t n, int64_t heads, int64_t kv_heads, int64_t max_positions, int64_t head_dim,
                              double scaling, int num_threads);

}  // namespace switchcit
