// CPU kernel for out = x · weightᵀ (+ bias) with few rows of x (contract in linear_cpu.h).
//
// Decode steps multiply a handful of rows by a large weight: the cost is reading the weight from
// memory once, so the work is cut over output features only. Each thread takes a contiguous run of
// blocks of kWeightRows weight rows and streams them exactly once; a block (a few KB, in L1) is dotted
// with every row of x (small, in L1/L2) in tiles of up to kXRows rows, kWeightRows × kXRows accumulator
// vectors in registers, while the next block is prefetched.
//
// Each output element is the dot product of one weight row with one x row, computed by one thread as:
// lane l sums the products at h ≡ l (mod kLanes) in increasing h (H zero-padded to a multiple of
// kLanes), the lanes are added in a fixed tree, then the bias. Nothing of that depends on M, on where
// the row sits in the batch or on the thread count.
#include "linear_cpu.h"

#include "cpu_common.h"
#include "cpu_vector.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace switchcit {
namespace {

// AVX2 has 16 vector registers: 3 × 4 accumulators, the 3 weight vectors of a step and one x vector at a
// time, each weight vector loaded once per step and used for kXRows products. Tiles of 4 rows: a decode
// step of up to 4 sequences reads each weight block once (with tiles of 3, four rows took two passes).
constexpr int kWeightRows = 3, kXRows = 4;
constexpr int64_t kCacheLine = 64;

template <typename T>
struct Linear {
  const float* x;   // [M, H], float32 whatever T is (converted once: it is read once per weight block)
  const T* weight;  // [O, H]
  const T* bias;    // [O] or null
  T* out;           // [M, O]
  int64_t rows, hidden, out_features;
};

// acc[j · kWeightRows + i] += x[j][h…h + 7] · w[i][h…h + 7] (kPart: only the first `count` lanes, zeros
// after them): the weight vectors loaded once, each x vector used for kWeightRows products.
template <bool kPart, int kRows, typename T>
SWITCHCIT_INLINE void accumulate_step(Vec (&acc)[kRows * kWeightRows], const float* const (&x)[kRows],
                                      const T* const (&w)[kWeightRows], int64_t h, int64_t count) {
  Vec wv[kWeightRows];
  for (int i = 0; i < kWeightRows; ++i) wv[i] = kPart ? load_part(w[i] + h, count) : load(w[i] + h);
  for (int j = 0; j < kRows; ++j) {
    const Vec xv = kPart ? load_part(x[j] + h, count) : load(x[j] + h);
    for (int i = 0; i < kWeightRows; ++i) acc[j * kWeightRows + i] += wv[i] * xv;
  }
}

// out[m0 + j, o0 + i] for i < kWeightRows (those below out_features), j < kRows. Meanwhile the bytes at
// addresses [ahead, ahead_end) of the next weight block are prefetched, two cache lines a step (more than
// a step reads of this block), so that they arrive from memory while this block's tiles compute.
template <int kRows, typename T>
SWITCHCIT_INLINE void dot_tile(const Linear<T>& p, const T* const (&w)[kWeightRows], int64_t o0, int64_t m0,
                               std::uintptr_t ahead, std::uintptr_t ahead_end) {
  const int64_t hidden = p.hidden;
  const float* x[kRows];
  for (int j = 0; j < kRows; ++j) x[j] = p.x + (m0 + j) * hidden;
  Vec acc[kRows * kWeightRows] = {};  // acc[j · kWeightRows + i]: x row j · weight row i
  int64_t h = 0;
  for (; h + kLanes <= hidden; h += kLanes) {
    if (ahead < ahead_end) {
      __builtin_prefetch(reinterpret_cast<const void*>(ahead));
      __builtin_prefetch(reinterpret_cast<const void*>(ahead + kCacheLine));
      ahead += 2 * kCacheLine;
    }
    accumulate_step<false>(acc, x, w, h, kLanes);
  }
  if (h < hidden) accumulate_step<true>(acc, x, w, h, hidden - h);
  float sums[kRows * kWeightRows];
  horizontal_sums(acc, sums);
  for (int j = 0; j < kRows; ++j) {
    T* out = p.out + (m0 + j) * p.out_features + o0;
    for (int i = 0; i < kWeightRows && o0 + i < p.out_features; ++i) {
      const float sum = sums[j * kWeightRows + i];
      store(out[i], p.bias ? sum + to_float(p.bias[o0 + i]) : sum);
    }
  }
}

// A tile of 1 <= rows <= kXRows rows: calls dot_tile<rows>.
template <int kRows = kXRows, typename T>
SWITCHCIT_INLINE void dot_rows(int rows, const Linear<T>& p, const T* const (&w)[kWeightRows], int64_t o0,
                               int64_t m0, std::uintptr_t ahead, std::uintptr_t ahead_end) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return dot_rows<kRows - 1>(rows, p, w, o0, m0, ahead, ahead_end);
  }
  dot_tile<kRows>(p, w, o0, m0, ahead, ahead_end);
}

// The height of the tile of x rows at `left` rows from the end: kXRows, the last one or two smaller. Five
// rows left make 2 + 3 rather than 4 + 1: a step of a 1-row tile loads more than it multiplies.
SWITCHCIT_INLINE int tile_rows(int64_t left) {
  return left == kXRows + 1 ? (kXRows + 1) / 2 : int(std::min<int64_t>(left, kXRows));
}

// Weight row blocks [first, last): all of out's columns [first, last) · kWeightRows.
template <typename T>
SWITCHCIT_MULTIVERSION void linear_blocks(const Linear<T>& p, int64_t first, int64_t last) {
  int64_t tiles = 0;
  for (int64_t m0 = 0; m0 < p.rows; m0 += tile_rows(p.rows - m0)) ++tiles;
  // Each tile prefetches an equal share of the next block, in pairs of cache lines.
  const int64_t block_bytes = kWeightRows * p.hidden * int64_t(sizeof(T));
  const int64_t share = (block_bytes / tiles + 2 * kCacheLine - 1) / (2 * kCacheLine) * (2 * kCacheLine);
  for (int64_t block = first; block < last; ++block) {
    const int64_t o0 = block * kWeightRows;
    // Past the last row, repeat it: a fixed block height keeps the accumulators in registers, and
    // those results are dropped.
    const T* w[kWeightRows];
    for (int i = 0; i < kWeightRows; ++i) w[i] = p.weight + std::min(o0 + i, p.out_features - 1) * p.hidden;
    // The next block, unless it is the last, partial one; rows are contiguous, so it is one byte range.
    const bool prefetch = o0 + 2 * kWeightRows <= p.out_features;
    const std::uintptr_t next = reinterpret_cast<std::uintptr_t>(p.weight) + (o0 + kWeightRows) * p.hidden * sizeof(T);
    const int64_t next_bytes = prefetch ? block_bytes : 0;
    for (int64_t m0 = 0, begin = 0; m0 < p.rows; begin += share) {
      const int rows = tile_rows(p.rows - m0);
      dot_rows(rows, p, w, o0, m0, next + std::min(begin, next_bytes), next + std::min(begin + share, next_bytes));
      m0 += rows;
    }
  }
}

}  // namespace

void linear_forward(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                    const std::string& dtype, int64_t rows, int64_t hidden, int64_t out_features,
                    int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    if (rows == 0 || out_features == 0) return;
    const T* x_in = reinterpret_cast<const T*>(x);
    std::vector<float> x_float;
    if constexpr (!std::is_same_v<T, float>) {
      x_float.resize(rows * hidden);
      for (int64_t i = 0; i < rows * hidden; ++i) x_float[i] = to_float(x_in[i]);
    }
    const float* x32 = x_float.empty() ? reinterpret_cast<const float*>(x) : x_float.data();
    const Linear<T> p{x32, reinterpret_cast<const T*>(weight), reinterpret_cast<const T*>(bias),
                      reinterpret_cast<T*>(out), rows, hidden, out_features};
    const int64_t blocks = (out_features + kWeightRows - 1) / kWeightRows;
    const int threads = int(std::clamp<int64_t>(num_threads, 1, blocks));
    // Equal contiguous runs of blocks: each thread streams its own part of the weight (runs of 16 blocks
    // claimed dynamically were measured slower on 2 threads: lm_head at 64 rows 24 → 41 ms).
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
      const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
      const int64_t thread = 0, team = 1;
#endif
      linear_blocks(p, blocks * thread / team, blocks * (thread + 1) / team);
    }
  });
}

}  // namespace switchcit
