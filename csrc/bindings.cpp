#include <pybind11/pybind11.h>

#include "routing.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "switchcit C++ core (CPU)";
  m.def("sort_tokens_by_adapter", &switchcit::sort_tokens_by_adapter, pybind11::arg("adapter_ids"),
        pybind11::arg("num_adapters"),
        "Stable counting sort of token indices by adapter id (-1 = base-only, sorted last).\n"
        "Returns (sorted_token_ids int32 [T], offsets int32 [N + 2]).");
}
