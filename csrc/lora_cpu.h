#pragma once
// CPU kernels for the routed multi-LoRA term, on raw buffers (no torch headers: the extension builds
// without torch). Pointers are addresses from tensor.data_ptr(), 0 = absent; every tensor is
// contiguous row-major and the Python caller has validated shapes, dtypes and ids.
//
// Shapes: x [T, H], lora_a [N, R, H], lora_b [N, O, R], out / grad_out [T, O], shrunk [T, R];
// sorted_token_ids int32 [T] and adapter_offsets int32 [N + 2] come from the routing plan.
// dtype ("float32" | "bfloat16") is the storage type of x, lora_a, lora_b, out, grad_out and grad_x;
// scaling, shrunk, grad_a and grad_b are float32, and all sums are taken in float32.

#include <cstdint>
#include <string>

namespace switchcit {

// out[t] += s_a · B_a[:, :r_a] (A_a[:r_a] x_t) for every token t with an adapter a; other rows are
// untouched. scaling (float32 [N]) = 0 → every adapter uses `scale`; ranks (int32 [N]) = 0 → every
// adapter uses max_rank. shrunk != 0 → shrunk[t] = A_a[:r_a] x_t, zero-padded to R (for backward).
void lora_forward(std::uintptr_t out, std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t lora_b,
                  std::uintptr_t sorted_token_ids, std::uintptr_t adapter_offsets, std::uintptr_t scaling,
                  std::uintptr_t ranks, std::uintptr_t shrunk, const std::string& dtype, int64_t num_tokens,
                  int64_t hidden, int64_t out_features, int64_t num_adapters, int64_t max_rank, double scale,
                  int num_threads);

// With ds_t = s_a · B_a[:, :r_a]ᵀ grad_out_t, for the outputs that are not 0:
//   grad_x[t] += A_a[:r_a]ᵀ ds_t                         (tokens with an adapter only)
//   grad_a[a, :r_a] = Σ_{t of a} ds_t ⊗ x_t              (overwritten; zeros elsewhere)
//   grad_b[a, :, :r_a] = s_a Σ_{t of a} grad_out_t ⊗ shrunk_t[:r_a]   (overwritten; zeros elsewhere)
// Deterministic: no element is summed by more than one thread, whatever num_threads is.
void lora_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t lora_b,
                   std::uintptr_t shrunk, std::uintptr_t sorted_token_ids, std::uintptr_t adapter_offsets,
                   std::uintptr_t scaling, std::uintptr_t ranks, std::uintptr_t grad_x, std::uintptr_t grad_a,
                   std::uintptr_t grad_b, const std::string& dtype, int64_t num_tokens, int64_t hidden,
                   int64_t out_features, int64_t num_adapters, int64_t max_rank, double scale,
                   int num_threads);

}  // namespace switchcit
