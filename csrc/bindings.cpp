#include <pybind11/pybind11.h>

#include "decoder_cpu.h"
#include "linear_cpu.h"
#include "lora_cpu.h"
#include "routing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "switchcit C++ core (CPU)";
  m.def("sort_tokens_by_adapter", &switchcit::sort_tokens_by_adapter, py::arg("adapter_ids"),
        py::arg("num_adapters"),
        "Stable counting sort of token indices by adapter id (-1 = base-only, sorted last).\n"
        "Returns (sorted_token_ids int32 [T], offsets int32 [N + 2]).");

  // The LoRA kernels take tensor.data_ptr() addresses (0 = absent) of contiguous, caller-validated
  // tensors and run without the GIL. See csrc/lora_cpu.h for the contract.
  m.def("lora_forward", &switchcit::lora_forward, py::arg("out"), py::arg("x"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("sorted_token_ids"), py::arg("adapter_offsets"), py::arg("scaling"),
        py::arg("ranks"), py::arg("shrunk"), py::arg("dtype"), py::arg("num_tokens"), py::arg("hidden"),
        py::arg("out_features"), py::arg("num_adapters"), py::arg("max_rank"), py::arg("scale"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "out[t] += s_a * B_a[:, :r_a] @ (A_a[:r_a] @ x[t]) for tokens with an adapter; optionally saves\n"
        "shrunk[t] = A_a[:r_a] @ x[t] (float32 [T, R], zero-padded) for the backward.");
  m.def("lora_backward", &switchcit::lora_backward, py::arg("grad_out"), py::arg("x"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("shrunk"), py::arg("sorted_token_ids"), py::arg("adapter_offsets"),
        py::arg("scaling"), py::arg("ranks"), py::arg("grad_x"), py::arg("grad_a"), py::arg("grad_b"),
        py::arg("dtype"), py::arg("num_tokens"), py::arg("hidden"), py::arg("out_features"),
        py::arg("num_adapters"), py::arg("max_rank"), py::arg("scale"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradients of lora_forward: grad_x += (accumulated), grad_a and grad_b = (float32, overwritten);\n"
        "pass 0 for any gradient that is not needed.");
  m.def("linear_forward", &switchcit::linear_forward, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("dtype"), py::arg("rows"), py::arg("hidden"), py::arg("out_features"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "out[M, O] = x[M, H] @ weight[O, H].T (+ bias[O]), float32 sums in an order fixed by H alone\n"
        "(see csrc/linear_cpu.h); bias 0 = none.");

  // A decoder layer's other ops (csrc/decoder_cpu.h), same conventions.
  m.def("rms_norm_forward", &switchcit::rms_norm_forward, py::arg("out"), py::arg("residual_out"), py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("dtype"), py::arg("rows"),
        py::arg("hidden"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "out = weight * rms_norm(x + residual); x + residual also to residual_out (residual 0: x alone).");
  m.def("rotary_forward", &switchcit::rotary_forward, py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"),
        py::arg("dtype"), py::arg("tokens"), py::arg("q_heads"), py::arg("k_heads"), py::arg("head_dim"),
        py::arg("q_stride"), py::arg("k_stride"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "In place: q, k <- x * cos + rotate_half(x) * sin, per token and head.");
  m.def("decode_attention_forward", &switchcit::decode_attention_forward, py::arg("out"), py::arg("q"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("positions"), py::arg("dtype"), py::arg("n"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("max_positions"), py::arg("head_dim"), py::arg("scaling"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "Token i of n attends to positions 0..positions[i] of slot i of the cache (grouped-query heads).");
}
