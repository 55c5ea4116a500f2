#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace switchcit {

// Returns (sorted_token_ids int32 [T], offsets int32 [N + 2]): tokens stably grouped by adapter,
// adapter a owning sorted positions [offsets[a], offsets[a + 1]), base-only tokens (id -1) last.
pybind11::tuple sort_tokens_by_adapter(pybind11::array ids, int64_t num_adapters);

}  // namespace switchcit
