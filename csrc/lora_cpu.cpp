// CPU kernels for the routed multi-LoRA term (contract in lora_cpu.h).
//
// The routing plan groups tokens by adapter. Work over tokens is cut into tiles of up to kTile tokens
// of one adapter, work over weights into (adapter, block of kColumnBlock columns) tasks. Either way
// each row read from cache serves a whole tile, and the innermost loops run over kLanes contiguous
// columns with the tile's accumulators in vector registers.
//   forward   phase 1, token tiles:    values_t = s_a A_a x_t        (A_a x_t saved as shrunk)
//             phase 2, output blocks:  out_t += B_a values_t
//   backward  pass 1, token tiles:     ds_t = s_a B_aᵀ grad_out_t,  grad_x_t += A_aᵀ ds_t
//             pass 2, column blocks:   grad_a, grad_b
// Every output element is summed by exactly one thread in a fixed order: no atomics, and results do
// not depend on the thread count.
#include "lora_cpu.h"

#include "cpu_common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace switchcit {
namespace {

constexpr int kLanes = 16;             // columns per register block: one AVX-512 vector of float32
constexpr int kTile = 8;               // rows per tile: tokens, ranks or output features
constexpr int64_t kColumnBlock = 256;  // columns per (adapter, column block) task
// Forward register blocks (accumulators + operands must fit the 32 vector registers): the shrink
// dots kShrinkRanks rows of A with kShrinkRows tokens, the expand adds kTile tokens × kExpandWidth
// output features.
constexpr int kShrinkRows = 4, kShrinkRanks = 4;
constexpr int kExpandWidth = 2 * kLanes;
// Row stride of a transposed block of lora_b: an odd number of 64-byte lines, so that its rows fall
// into different cache sets (with a power-of-two stride they would all share one and evict each other).
constexpr int64_t kBlockStride = (kColumnBlock / kLanes | 1) * kLanes;

// acc[i][j][l] += w[i][i0 + l] · v[j][i0 + l] for l < width.
template <int kWeights, int kRows, typename W, typename V>
SWITCHCIT_INLINE void accumulate_products(float (&acc)[kWeights][kRows][kLanes], const W* const* w,
                                          const V* const* v, int64_t i0, int width) {
  for (int i = 0; i < kWeights; ++i)
    for (int j = 0; j < kRows; ++j) {
#pragma omp simd
      for (int l = 0; l < width; ++l) acc[i][j][l] += to_float(w[i][i0 + l]) * to_float(v[j][i0 + l]);
    }
}

// out[j * out_stride + k] = Σ_i weights[k * weight_stride + i] · vectors[j][i] for j < kRows, k < count.
// kWeights weight rows at a time are dotted with all kRows vectors: each vector block loaded serves
// kWeights rows and each weight block kRows vectors, which keeps the loads below one per FMA.
template <int kWeights, int kRows, typename W, typename V>
SWITCHCIT_MULTIVERSION void dot_rows(const W* weights, int64_t weight_stride, int count,
                                     const V* const* vectors, int64_t len, float* out, int64_t out_stride) {
  for (int k0 = 0; k0 < count; k0 += kWeights) {
    // Past the last row, repeat it: a fixed block height keeps the accumulators in registers, and
    // those results are dropped.
    const W* rows[kWeights];
    for (int i = 0; i < kWeights; ++i) rows[i] = weights + std::min(k0 + i, count - 1) * weight_stride;
    float acc[kWeights][kRows][kLanes] = {};
    int64_t i0 = 0;
    for (; i0 + kLanes <= len; i0 += kLanes) accumulate_products(acc, rows, vectors, i0, kLanes);
    accumulate_products(acc, rows, vectors, i0, int(len - i0));
    for (int i = 0; i < kWeights && k0 + i < count; ++i)
      for (int j = 0; j < kRows; ++j) {
        float sum = 0.0f;
        for (int l = 0; l < kLanes; ++l) sum += acc[i][j][l];
        out[j * out_stride + k0 + i] = sum;
      }
  }
}

// dst[j][i0 + l] += Σ_m coef(j, m) · src(m)[i0 + l] for j < kRows, l < width <= kWidth.
template <int kRows, int kWidth, typename D, typename Coef, typename Src>
SWITCHCIT_INLINE void combine_block(D* const* dst, int64_t i0, int width, int count, const Coef& coef,
                                    const Src& src) {
  // Started from the first product rather than from zeros (the same sums): zeroing a memory block first
  // costs as much as a few products.
  float acc[kRows][kWidth];
  for (int j = 0; j < kRows; ++j) {
    const float c = coef(j, 0);
#pragma omp simd
    for (int l = 0; l < width; ++l) acc[j][l] = c * to_float(src(0)[i0 + l]);
  }
  for (int m = 1; m < count; ++m) {
    const auto* row = src(m) + i0;
    for (int j = 0; j < kRows; ++j) {
      const float c = coef(j, m);
#pragma omp simd
      for (int l = 0; l < width; ++l) acc[j][l] += c * to_float(row[l]);
    }
  }
  for (int j = 0; j < kRows; ++j) {
    D* d = dst[j] + i0;
#pragma omp simd
    for (int l = 0; l < width; ++l) store(d[l], to_float(d[l]) + acc[j][l]);
  }
}

// dst[j][i] += Σ_m coef(j, m) · src(m)[i] for j < kRows, i < len, m < count: each source row is read
// once and added into all kRows destination rows, kWidth columns (a multiple of kLanes) at a time.
template <int kRows, int kWidth = kLanes, typename D, typename Coef, typename Src>
SWITCHCIT_MULTIVERSION void add_combination(D* const* dst, int64_t len, int count, Coef coef, Src src) {
  if (count == 0) return;  // an empty sum; combine_block reads the first source row (none here: O = 0)
  int64_t i0 = 0;
  for (; i0 + kWidth <= len; i0 += kWidth) combine_block<kRows, kWidth>(dst, i0, kWidth, count, coef, src);
  for (; i0 < len; i0 += kLanes)
    combine_block<kRows, kLanes>(dst, i0, int(std::min<int64_t>(kLanes, len - i0)), count, coef, src);
}

// Calls fn(std::integral_constant<int, rows>) for 1 <= rows <= kTile: kernels get the tile height as a
// compile-time constant, which keeps their accumulators in registers.
template <int kRows = kTile, typename Fn>
void with_rows(int rows, const Fn& fn) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return with_rows<kRows - 1>(rows, fn);
  }
  fn(std::integral_constant<int, kRows>());
}

template <typename T>
struct Problem {
  const T* x;       // [T, H]
  const T* lora_a;  // [N, R, H]
  const T* lora_b;  // [N, O, R]
  const int32_t* sorted_token_ids;
  const int32_t* adapter_offsets;
  const float* scaling;  // [N] or null: every adapter uses `scale`
  const int32_t* ranks;  // [N] or null: every adapter uses max_rank
  float scale;
  int64_t hidden, out_features, num_adapters, max_rank;

  // Clamped so that ranks not checked by the caller (graph capture, inference tensors) stay in bounds.
  int rank(int64_t adapter) const { return ranks ? std::clamp(ranks[adapter], 0, int(max_rank)) : int(max_rank); }
  float scaling_of(int64_t adapter) const { return scaling ? scaling[adapter] : scale; }
  const T* a_rows(int64_t adapter) const { return lora_a + adapter * max_rank * hidden; }
  int token_count(int64_t adapter) const { return adapter_offsets[adapter + 1] - adapter_offsets[adapter]; }
};

template <typename T>
Problem<T> make_problem(std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t lora_b,
                        std::uintptr_t sorted_token_ids, std::uintptr_t adapter_offsets,
                        std::uintptr_t scaling, std::uintptr_t ranks, double scale, int64_t num_tokens,
                        int64_t hidden, int64_t out_features, int64_t num_adapters, int64_t max_rank) {
  // The one check that is cheap here: a plan built for another batch would index out of bounds.
  if (reinterpret_cast<const int32_t*>(adapter_offsets)[num_adapters + 1] != num_tokens)
    throw std::invalid_argument(
        "adapter_offsets[N + 1] must equal num_tokens: routing plan of another batch?");
  return {reinterpret_cast<const T*>(x),
          reinterpret_cast<const T*>(lora_a),
          reinterpret_cast<const T*>(lora_b),
          reinterpret_cast<const int32_t*>(sorted_token_ids),
          reinterpret_cast<const int32_t*>(adapter_offsets),
          reinterpret_cast<const float*>(scaling),
          reinterpret_cast<const int32_t*>(ranks),
          float(scale),
          hidden,
          out_features,
          num_adapters,
          max_rank};
}

// Up to kTile tokens of one adapter: sorted positions [begin, begin + count).
struct Tile {
  int32_t adapter, begin, count;
};

std::vector<Tile> make_tiles(const int32_t* adapter_offsets, int64_t num_adapters) {
  std::vector<Tile> tiles;
  for (int32_t adapter = 0; adapter < num_adapters; ++adapter) {
    const int32_t end = adapter_offsets[adapter + 1];
    for (int32_t begin = adapter_offsets[adapter]; begin < end; begin += kTile)
      tiles.push_back({adapter, begin, std::min(kTile, end - begin)});
  }
  return tiles;
}

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Runs fn(tile) for every token tile, in parallel.
template <typename T, typename Fn>
void for_each_tile(const Problem<T>& p, int threads, const Fn& fn) {
  const std::vector<Tile> tiles = make_tiles(p.adapter_offsets, p.num_adapters);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < int64_t(tiles.size()); ++i) fn(tiles[i]);
}

// Runs fn(adapter, first column) for every (adapter, column block of `len`), in parallel. Adapters
// vary fastest, so threads running at the same time work on different token rows: neighbouring blocks
// of one row would share cache lines (and prefetches) between cores.
template <typename T, typename Fn>
void for_each_column_block(const Problem<T>& p, int64_t len, int threads, const Fn& fn) {
  const int64_t blocks = (len + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t task = 0; task < p.num_adapters * blocks; ++task)
    fn(int32_t(task % p.num_adapters), (task / p.num_adapters) * kColumnBlock);
}

// values_t = s_a A_a x_t for the tile's tokens (A_a x_t also saved to shrunk). `values` is [tokens with
// an adapter, R], by sorted position. Tokens in blocks of kShrinkRows, ranks in blocks of kShrinkRanks.
template <typename T>
void shrink_tile(const Problem<T>& p, const Tile& tile, float* values, float* shrunk) {
  const int64_t hidden = p.hidden, max_rank = p.max_rank;
  const int rank = p.rank(tile.adapter);
  const T* x_rows[kTile];
  for (int j = 0; j < tile.count; ++j) x_rows[j] = p.x + p.sorted_token_ids[tile.begin + j] * hidden;
  float* tile_values = values + int64_t(tile.begin) * max_rank;
  for (int j0 = 0; j0 < tile.count; j0 += kShrinkRows) {
    with_rows<kShrinkRows>(std::min(kShrinkRows, tile.count - j0), [&](auto height) {
      dot_rows<kShrinkRanks, height()>(p.a_rows(tile.adapter), hidden, rank, x_rows + j0, hidden,
                                       tile_values + j0 * max_rank, max_rank);
    });
  }
  const float scaling = p.scaling_of(tile.adapter);
  for (int j = 0; j < tile.count; ++j) {
    float* row_values = tile_values + j * max_rank;
    if (shrunk) {
      float* row = shrunk + p.sorted_token_ids[tile.begin + j] * max_rank;
      std::copy(row_values, row_values + rank, row);
      std::fill(row + rank, row + max_rank, 0.0f);
    }
    for (int k = 0; k < rank; ++k) row_values[k] *= scaling;
  }
}

// out_t += B_a values_t for the tokens at sorted positions [begin, end), all of one adapter, a block
// of kColumnBlock output features at a time. Each block of B_a is first transposed into `b_block`
// ([R, kBlockStride] float32, small enough to stay in L1), so that its rows run over output features
// like out's, and then serves every tile.
template <typename T>
void expand_run(const Problem<T>& p, const float* values, T* out, int32_t adapter, int32_t begin, int32_t end,
                float* b_block) {
  const int64_t out_features = p.out_features, max_rank = p.max_rank;
  const int rank = p.rank(adapter);
  if (rank == 0) return;  // leave out's rows bitwise as they are
  for (int64_t o0 = 0; o0 < out_features; o0 += kColumnBlock) {
    const int64_t width = std::min(kColumnBlock, out_features - o0);
    const T* b = p.lora_b + (adapter * out_features + o0) * max_rank;
    for (int64_t o = 0; o < width; ++o)
      for (int k = 0; k < rank; ++k) b_block[k * kBlockStride + o] = to_float(b[o * max_rank + k]);
    for (int32_t tile = begin; tile < end; tile += kTile) {
      const int rows = std::min(kTile, end - tile);
      T* out_rows[kTile];
      for (int j = 0; j < rows; ++j) out_rows[j] = out + p.sorted_token_ids[tile + j] * out_features + o0;
      const float* tile_values = values + int64_t(tile) * max_rank;
      with_rows(rows, [&](auto height) {
        add_combination<height(), kExpandWidth>(
            out_rows, width, rank, [=](int j, int k) { return tile_values[j * max_rank + k]; },
            [=](int k) { return b_block + k * kBlockStride; });
      });
    }
  }
}

// Backward pass 1 for one tile: ds_t = s_a B_aᵀ grad_out_t (kept for pass 2) and grad_x_t += A_aᵀ ds_t.
// `ds` is [tokens with an adapter, R] by sorted position, zero-initialised.
template <typename T>
void backward_tile(const Problem<T>& p, const Tile& tile, const T* grad_out, float* ds, T* grad_x) {
  const int64_t hidden = p.hidden, out_features = p.out_features, max_rank = p.max_rank;
  const int rank = p.rank(tile.adapter);
  if (rank == 0) return;
  // Zero-initialised: the lambdas below copy whole arrays, unused entries included.
  const T* grad_out_rows[kTile] = {};
  float* ds_rows[kTile] = {};
  T* grad_x_rows[kTile] = {};
  for (int j = 0; j < tile.count; ++j) {
    const int64_t token = p.sorted_token_ids[tile.begin + j];
    grad_out_rows[j] = grad_out + token * out_features;
    ds_rows[j] = ds + (int64_t(tile.begin) + j) * max_rank;
    grad_x_rows[j] = grad_x ? grad_x + token * hidden : nullptr;
  }
  // Rows of lora_b[a] ([O, R]) run over ranks like ds's: add them up weighted by grad_out.
  const float scaling = p.scaling_of(tile.adapter);
  const T* b_rows = p.lora_b + tile.adapter * out_features * max_rank;
  with_rows(tile.count, [&](auto height) {
    add_combination<height()>(
        ds_rows, rank, int(out_features),
        [=](int j, int o) { return scaling * to_float(grad_out_rows[j][o]); },
        [=](int o) { return b_rows + o * max_rank; });
  });
  if (!grad_x) return;
  const T* a_rows = p.a_rows(tile.adapter);
  with_rows(tile.count, [&](auto height) {
    add_combination<height()>(
        grad_x_rows, hidden, rank, [=](int j, int k) { return ds_rows[j][k]; },
        [=](int k) { return a_rows + k * hidden; });
  });
}

// grad_a[a, :, h0 : h0 + kColumnBlock] = Σ_{t of a} ds_t ⊗ x_t, kTile ranks at a time.
template <typename T>
void grad_a_block(const Problem<T>& p, const float* ds, float* grad_a, int32_t adapter, int64_t h0) {
  const int64_t hidden = p.hidden, max_rank = p.max_rank;
  const int64_t width = std::min(kColumnBlock, hidden - h0);
  float* slice = grad_a + adapter * max_rank * hidden + h0;
  for (int64_t k = 0; k < max_rank; ++k) std::fill_n(slice + k * hidden, width, 0.0f);
  const int rank = p.rank(adapter), count = p.token_count(adapter);
  if (rank == 0 || count == 0) return;

  const int32_t begin = p.adapter_offsets[adapter];
  const int32_t* tokens = p.sorted_token_ids + begin;
  const T* x_block = p.x + h0;
  for (int k0 = 0; k0 < rank; k0 += kTile) {
    const int rows = std::min(kTile, rank - k0);
    float* dst[kTile];
    for (int j = 0; j < rows; ++j) dst[j] = slice + (k0 + j) * hidden;
    const float* ds_columns = ds + begin * max_rank + k0;
    with_rows(rows, [&](auto height) {
      add_combination<height()>(
          dst, width, count, [=](int j, int m) { return ds_columns[m * max_rank + j]; },
          [=](int m) { return x_block + tokens[m] * hidden; });
    });
  }
}

// grad_b[a, o0 : o0 + kColumnBlock, :r_a] = s_a Σ_{t of a} grad_out_t ⊗ shrunk_t, kTile features at a time.
template <typename T>
void grad_b_block(const Problem<T>& p, const T* grad_out, const float* shrunk, float* grad_b, int32_t adapter,
                  int64_t o0) {
  const int64_t out_features = p.out_features, max_rank = p.max_rank;
  const int64_t width = std::min(kColumnBlock, out_features - o0);
  float* slice = grad_b + (adapter * out_features + o0) * max_rank;
  std::fill_n(slice, width * max_rank, 0.0f);
  const int rank = p.rank(adapter), count = p.token_count(adapter);
  if (rank == 0 || count == 0) return;

  const int32_t* tokens = p.sorted_token_ids + p.adapter_offsets[adapter];
  const float scaling = p.scaling_of(adapter);
  for (int64_t o = 0; o < width; o += kTile) {
    const int rows = int(std::min<int64_t>(kTile, width - o));
    float* dst[kTile];
    for (int j = 0; j < rows; ++j) dst[j] = slice + (o + j) * max_rank;
    const T* grad_out_columns = grad_out + o0 + o;
    with_rows(rows, [&](auto height) {
      add_combination<height()>(
          dst, rank, count,
          [=](int j, int m) { return scaling * to_float(grad_out_columns[tokens[m] * out_features + j]); },
          [=](int m) { return shrunk + tokens[m] * max_rank; });
    });
  }
}

template <typename T>
void forward_impl(const Problem<T>& p, T* out, float* shrunk, int threads) {
  // Each thread takes a contiguous run of token tiles (an equal share of the tokens) and does both
  // the shrink and the expand of them: tiles own their rows of out, so there is no second pass and no
  // barrier. The run is sorted by adapter: the expand goes one adapter at a time, so that each block
  // of B_a is converted once per thread.
  const std::vector<Tile> tiles = make_tiles(p.adapter_offsets, p.num_adapters);
  const int64_t routed = p.adapter_offsets[p.num_adapters];
  std::vector<float> values(routed * p.max_rank);
  const int64_t b_block_size = p.max_rank * kBlockStride;
  std::vector<float> b_blocks(threads * b_block_size);
#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = thread_index(), team = team_size();
    const auto owned = [&](const Tile& tile) { return tile.begin * team / routed == thread; };
    for (size_t i = 0; i < tiles.size();) {
      if (!owned(tiles[i])) {
        ++i;
        continue;
      }
      // tiles[i, next): this thread's tiles of one adapter.
      size_t next = i;
      for (; next < tiles.size() && owned(tiles[next]) && tiles[next].adapter == tiles[i].adapter; ++next)
        shrink_tile(p, tiles[next], values.data(), shrunk);
      expand_run(p, values.data(), out, tiles[i].adapter, tiles[i].begin,
                 tiles[next - 1].begin + tiles[next - 1].count, b_blocks.data() + thread * b_block_size);
      i = next;
    }
  }
}

template <typename T>
void backward_impl(const Problem<T>& p, const T* grad_out, const float* shrunk, T* grad_x, float* grad_a,
                   float* grad_b, int threads) {
  // Pass 1, over token tiles: ds and grad_x. Pass 2, over (adapter, column block) tasks that write
  // disjoint parts of grad_a and grad_b.
  std::vector<float> ds;
  if (grad_x || grad_a) {
    ds.resize(int64_t(p.adapter_offsets[p.num_adapters]) * p.max_rank);
    for_each_tile(p, threads, [&](const Tile& tile) { backward_tile(p, tile, grad_out, ds.data(), grad_x); });
  }
  if (grad_a) {
    for_each_column_block(p, p.hidden, threads, [&](int32_t adapter, int64_t h0) {
      grad_a_block(p, ds.data(), grad_a, adapter, h0);
    });
  }
  if (grad_b) {
    for_each_column_block(p, p.out_features, threads, [&](int32_t adapter, int64_t o0) {
      grad_b_block(p, grad_out, shrunk, grad_b, adapter, o0);
    });
  }
}

}  // namespace

void lora_forward(std::uintptr_t out, std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t lora_b,
                  std::uintptr_t sorted_token_ids, std::uintptr_t adapter_offsets, std::uintptr_t scaling,
                  std::uintptr_t ranks, std::uintptr_t shrunk, const std::string& dtype, int64_t num_tokens,
                  int64_t hidden, int64_t out_features, int64_t num_adapters, int64_t max_rank, double scale,
                  int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    const Problem<T> p = make_problem<T>(x, lora_a, lora_b, sorted_token_ids, adapter_offsets, scaling, ranks,
                                         scale, num_tokens, hidden, out_features, num_adapters, max_rank);
    forward_impl(p, reinterpret_cast<T*>(out), reinterpret_cast<float*>(shrunk), std::max(1, num_threads));
  });
}

void lora_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t lora_b,
                   std::uintptr_t shrunk, std::uintptr_t sorted_token_ids, std::uintptr_t adapter_offsets,
                   std::uintptr_t scaling, std::uintptr_t ranks, std::uintptr_t grad_x, std::uintptr_t grad_a,
                   std::uintptr_t grad_b, const std::string& dtype, int64_t num_tokens, int64_t hidden,
                   int64_t out_features, int64_t num_adapters, int64_t max_rank, double scale,
                   int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    const Problem<T> p = make_problem<T>(x, lora_a, lora_b, sorted_token_ids, adapter_offsets, scaling, ranks,
                                         scale, num_tokens, hidden, out_features, num_adapters, max_rank);
    backward_impl(p, reinterpret_cast<const T*>(grad_out), reinterpret_cast<const float*>(shrunk),
                  reinterpret_cast<T*>(grad_x), reinterpret_cast<float*>(grad_a),
                  reinterpret_cast<float*>(grad_b), std::max(1, num_threads));
  });
}

}  // namespace switchcit
