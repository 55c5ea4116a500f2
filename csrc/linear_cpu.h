#pragma once
// CPU kernel for a dense linear layer with few input rows (decode steps), on raw buffers like
// lora_cpu.h: pointers are addresses from tensor.data_ptr(), 0 = absent; every tensor is contiguous
// row-major and the Python caller has validated shapes and dtypes.
//
// Shapes: x [M, H], weight [O, H], bias [O], out [M, O]; dtype ("float32" | "bfloat16") is the
// storage type of all four, sums are taken in float32.

#include <cstdint>
#include <string>

namespace switchcit {

// out[m, o] = Σ_h x[m, h] · weight[o, h] (+ bias[o]). Each element is summed by one thread in an order
// fixed by H alone, so a row's result is bitwise the same whatever M, its place in the batch and
// num_threads are.
void linear_forward(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                    const std::string& dtype, int64_t rows, int64_t hidden, int64_t out_features,
                    int num_threads);

}  // namespace switchcit
