// CPU routing metadata: a stable counting sort of tokens by adapter, O(T + N) in one pass each way.
// Same contract as the device path in switchcit/routing.py (torch.sort + searchsorted), which the
// tests compare it with.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "routing.h"

namespace py = pybind11;

namespace switchcit {

template <typename Index>
static py::tuple sort_tokens_impl(py::array_t<Index, py::array::c_style | py::array::forcecast> ids,
                                  int64_t num_adapters) {
  if (ids.ndim() != 1) throw std::invalid_argument("adapter_ids must be 1-D");
  if (num_adapters < 0) throw std::invalid_argument("num_adapters must be >= 0");
  const int64_t num_tokens = ids.shape(0);
  if (num_tokens > INT32_MAX) throw std::invalid_argument("more than 2^31 - 1 tokens");
  const Index* id = ids.data();

  // Bucket num_adapters holds the base-only tokens (id == -1), so they sort last.
  py::array_t<int32_t> offsets(num_adapters + 2);
  py::array_t<int32_t> sorted_token_ids(num_tokens);
  int32_t* off = offsets.mutable_data();
  int32_t* out = sorted_token_ids.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> next(num_adapters + 2, 0);
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t a = id[t];
      if (a < -1 || a >= num_adapters) {
        // Thrown without the GIL: the release guard re-takes it while unwinding.
        throw std::invalid_argument("adapter id " + std::to_string(a) + " at token " +
                                    std::to_string(t) + " is outside [-1, " +
                                    std::to_string(num_adapters) + ")");
      }
      ++next[(a < 0 ? num_adapters : a) + 1];
    }
    for (int64_t b = 0; b <= num_adapters; ++b) next[b + 1] += next[b];
    for (int64_t b = 0; b < num_adapters + 2; ++b) off[b] = static_cast<int32_t>(next[b]);
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t a = id[t];
      out[next[a < 0 ? num_adapters : a]++] = static_cast<int32_t>(t);
    }
  }
  return py::make_tuple(std::move(sorted_token_ids), std::move(offsets));
}

py::tuple sort_tokens_by_adapter(py::array ids, int64_t num_adapters) {
  if (py::isinstance<py::array_t<int32_t>>(ids)) return sort_tokens_impl<int32_t>(ids, num_adapters);
  if (py::isinstance<py::array_t<int64_t>>(ids)) return sort_tokens_impl<int64_t>(ids, num_adapters);
  throw py::type_error("adapter_ids must be int32 or int64, got " +
                       std::string(py::str(ids.dtype())));
}

}  // namespace switchcit
