// CPU kernels for a decoder layer's ops besides its linear layers (contract in decoder_cpu.h).
//
// A decode step runs a few tokens through every layer: each of these ops is a few µs of arithmetic, and
// the composed PyTorch ops it replaces cost ~10× that in dispatch alone (LlamaRMSNorm is 8 ops, rotary
// 14, SDPA's masked path ~150 µs a call). So each kernel is one pass over its rows, one thread a row
// (or a slot's key head) at a time.
#include "decoder_cpu.h"

#include "cpu_common.h"
#include "cpu_vector.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace switchcit {
namespace {

// Below this many elements an op runs on one thread: a decode step's norm or rotary is a few µs, less
// than waking a second thread (or waiting for one that the OS has preempted).
constexpr int64_t kParallelElements = 1 << 16;
constexpr int kPartials = 16;  // partial sums of a norm's reduction: one AVX-512 or two AVX2 vectors

// value as the storage type T would hold it (float: unchanged).
template <typename T>
SWITCHCIT_INLINE float rounded(float value) {
  T stored;
  store(stored, value);
  return to_float(stored);
}

template <typename T>
SWITCHCIT_MULTIVERSION void rms_norm_row(T* out, T* residual_out, const T* x, const T* residual, const T* weight,
                                          float eps, int64_t hidden, float* sum_buffer) {
  float lanes[kPartials] = {};
  for (int64_t h0 = 0; h0 < hidden; h0 += kPartials) {
    const int64_t width = std::min<int64_t>(kPartials, hidden - h0);
#pragma omp simd
    for (int64_t l = 0; l < width; ++l) {
      float value = to_float(x[h0 + l]);
      if (residual) value = rounded<T>(value + to_float(residual[h0 + l]));
      sum_buffer[h0 + l] = value;
      lanes[l] += value * value;
    }
  }
  float sum = 0;
  for (int l = 0; l < kPartials; ++l) sum += lanes[l];
  const float inverse = 1.0f / std::sqrt(sum / float(hidden) + eps);
  if (residual_out) {
    for (int64_t h = 0; h < hidden; ++h) store(residual_out[h], sum_buffer[h]);
  }
#pragma omp simd
  for (int64_t h = 0; h < hidden; ++h) store(out[h], to_float(weight[h]) * rounded<T>(sum_buffer[h] * inverse));
}

template <typename T>
SWITCHCIT_MULTIVERSION void rotate_head(T* x, const T* cos, const T* sin, int64_t half) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float a = to_float(x[j]), b = to_float(x[j + half]);
    const float first = rounded<T>(rounded<T>(a * to_float(cos[j])) + rounded<T>(-b * to_float(sin[j])));
    const float second = rounded<T>(rounded<T>(b * to_float(cos[j + half])) + rounded<T>(a * to_float(sin[j + half])));
    store(x[j], first);
    store(x[j + half], second);
  }
}

// e^x for x ≤ 0 (scores less their maximum), in a form that vectorises: 2^n · e^f with |f| ≤ ln2 / 2 by
// Cody–Waite reduction and a degree-6 polynomial (Cephes' expf, ~1 ulp); below −87 it flushes to 0.
SWITCHCIT_INLINE float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * f * f + f + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : y * scale;
}

// Softmax of each of the `group` rows of scores [group, length], in place.
SWITCHCIT_INLINE void softmax_rows(float* scores, int64_t group, int64_t length) {
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * length;
    float top = row[0];
    for (int64_t p = 1; p < length; ++p) top = std::max(top, row[p]);
    float total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t p = 0; p < length; ++p) {
      row[p] = exp_nonpositive(row[p] - top);
      total += row[p];
    }
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t p = 0; p < length; ++p) row[p] *= inverse;
  }
}

// The `group` query heads of slot i that read key head kv: q, out [group, D]; keys, values
// [length, D]; scores [group, length] and accumulators [group, D] are scratch.
template <typename T>
SWITCHCIT_MULTIVERSION void attend(T* out, const T* q, const T* keys, const T* values, int64_t length, int64_t group,
                                   int64_t head_dim, float scaling, float* scores, float* query, float* acc) {
  for (int64_t g = 0; g < group; ++g) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = to_float(q[g * head_dim + d]) * scaling;
  }
  for (int64_t p = 0; p < length; ++p) {
    const T* key = keys + p * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = query + g * head_dim;
      float dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * to_float(key[d]);
      scores[g * length + p] = dot;
    }
  }
  softmax_rows(scores, group, length);
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t p = 0; p < length; ++p) {
    const T* value = values + p * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float weight = scores[g * length + p];
      float* ag = acc + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += weight * to_float(value[d]);
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) store(out[i], acc[i]);
}

// The same for head_dim kD (a multiple of 32) in registers: query heads in chunks of up to 3, scores
// four positions at a time (3 × 4 accumulators), values a quarter of a 64-dim head at a time.
constexpr int kChunk = 3, kPositions = 4, kValueVectors = 4;

// scores[g · length + p] = query_g · K_p for the kG heads of `query` ([kG, kD], scaled), every p < length;
// a last block short of kPositions repeats position length − 1 and drops those results.
template <int kG, int kD, typename T>
SWITCHCIT_INLINE void chunk_scores(float* scores, const float* query, const T* keys, int64_t length) {
  for (int64_t p0 = 0; p0 < length; p0 += kPositions) {
    const T* key[kPositions];
    for (int i = 0; i < kPositions; ++i) key[i] = keys + std::min(p0 + i, length - 1) * kD;
    Vec acc[kG * kPositions] = {};
    for (int d = 0; d < kD; d += kLanes) {
      Vec kv[kPositions];
      for (int i = 0; i < kPositions; ++i) kv[i] = load(key[i] + d);
      for (int g = 0; g < kG; ++g) {
        const Vec qv = load(query + g * kD + d);
        for (int i = 0; i < kPositions; ++i) acc[g * kPositions + i] += qv * kv[i];
      }
    }
    float sums[kG * kPositions];
    horizontal_sums(acc, sums);
    for (int g = 0; g < kG; ++g)
      for (int i = 0; i < kPositions && p0 + i < length; ++i) scores[g * length + p0 + i] = sums[g * kPositions + i];
  }
}

// acc_g = Σ_p weights[g · length + p] V_p for the kG heads ([kG, kD] float32, overwritten).
template <int kG, int kD, typename T>
SWITCHCIT_INLINE void chunk_values(float* acc_out, const float* weights, const T* values, int64_t length) {
  static_assert(kD % (kValueVectors * kLanes) == 0, "a head is a whole number of value passes");
  for (int d0 = 0; d0 < kD; d0 += kValueVectors * kLanes) {
    Vec acc[kG][kValueVectors] = {};
    for (int64_t p = 0; p < length; ++p) {
      Vec weight[kG];
      for (int g = 0; g < kG; ++g) weight[g] = Vec{} + weights[g * length + p];
      for (int v = 0; v < kValueVectors; ++v) {
        const Vec value = load(values + p * kD + d0 + v * kLanes);
        for (int g = 0; g < kG; ++g) acc[g][v] += weight[g] * value;
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int v = 0; v < kValueVectors; ++v) store(acc_out + g * kD + d0 + v * kLanes, acc[g][v]);
  }
}

template <int kD, typename T>
SWITCHCIT_MULTIVERSION void attend_in_registers(T* out, const T* q, const T* keys, const T* values, int64_t length,
                                                int64_t group, float scaling, float* scores, float* query,
                                                float* acc) {
  for (int64_t i = 0; i < group * kD; ++i) query[i] = to_float(q[i]) * scaling;
  for (int64_t g0 = 0; g0 < group; g0 += kChunk) {
    const int64_t heads = std::min<int64_t>(kChunk, group - g0);
    float* chunk = scores + g0 * length;
    if (heads == 3) chunk_scores<3, kD>(chunk, query + g0 * kD, keys, length);
    else if (heads == 2) chunk_scores<2, kD>(chunk, query + g0 * kD, keys, length);
    else chunk_scores<1, kD>(chunk, query + g0 * kD, keys, length);
  }
  softmax_rows(scores, group, length);
  for (int64_t g0 = 0; g0 < group; g0 += kChunk) {
    const int64_t heads = std::min<int64_t>(kChunk, group - g0);
    const float* chunk = scores + g0 * length;
    if (heads == 3) chunk_values<3, kD>(acc + g0 * kD, chunk, values, length);
    else if (heads == 2) chunk_values<2, kD>(acc + g0 * kD, chunk, values, length);
    else chunk_values<1, kD>(acc + g0 * kD, chunk, values, length);
  }
  for (int64_t i = 0; i < group * kD; ++i) store(out[i], acc[i]);
}

}  // namespace

void rms_norm_forward(std::uintptr_t out, std::uintptr_t residual_out, std::uintptr_t x, std::uintptr_t residual,
                      std::uintptr_t weight, double eps, const std::string& dtype, int64_t rows, int64_t hidden,
                      int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    const int threads = rows * hidden < kParallelElements ? 1 : int(std::clamp<int64_t>(num_threads, 1, rows));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      std::vector<float> sums(hidden);
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t at = row * hidden;
        rms_norm_row(reinterpret_cast<T*>(out) + at, residual_out ? reinterpret_cast<T*>(residual_out) + at : nullptr,
                     reinterpret_cast<const T*>(x) + at, residual ? reinterpret_cast<const T*>(residual) + at : nullptr,
                     reinterpret_cast<const T*>(weight), float(eps), hidden, sums.data());
      }
    }
  });
}

void rotary_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t cos, std::uintptr_t sin,
                    const std::string& dtype, int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                    int64_t q_stride, int64_t k_stride, int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    const int64_t elements = tokens * (q_heads + k_heads) * head_dim;
    const int threads = elements < kParallelElements ? 1 : int(std::clamp<int64_t>(num_threads, 1, tokens));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* c = reinterpret_cast<const T*>(cos) + t * head_dim;
      const T* s = reinterpret_cast<const T*>(sin) + t * head_dim;
      for (int64_t h = 0; h < q_heads; ++h)
        rotate_head(reinterpret_cast<T*>(q) + t * q_stride + h * head_dim, c, s, head_dim / 2);
      for (int64_t h = 0; h < k_heads; ++h)
        rotate_head(reinterpret_cast<T*>(k) + t * k_stride + h * head_dim, c, s, head_dim / 2);
    }
  });
}

void decode_attention_forward(std::uintptr_t out, std::uintptr_t q, std::uintptr_t key_cache,
                              std::uintptr_t value_cache, std::uintptr_t positions, const std::string& dtype,
                              int64_t n, int64_t heads, int64_t kv_heads, int64_t max_positions, int64_t head_dim,
                              double scaling, int num_threads) {
  with_storage_type(dtype, [&](auto storage) {
    using T = decltype(storage);
    const int64_t group = heads / kv_heads, pairs = n * kv_heads;
    const int64_t* position = reinterpret_cast<const int64_t*>(positions);
    const int threads = int(std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(pairs, 1)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      std::vector<float> scores(group * max_positions), query(group * head_dim), acc(group * head_dim);
#pragma omp for schedule(dynamic)
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t slot = pair / kv_heads, kv = pair % kv_heads;
        const int64_t head_at = (slot * heads + kv * group) * head_dim;
        const int64_t cache_at = (slot * kv_heads + kv) * max_positions * head_dim;
        T* const o = reinterpret_cast<T*>(out) + head_at;
        const T* const query_heads = reinterpret_cast<const T*>(q) + head_at;
        const T* const keys = reinterpret_cast<const T*>(key_cache) + cache_at;
        const T* const values = reinterpret_cast<const T*>(value_cache) + cache_at;
        const int64_t length = position[slot] + 1;
        if (head_dim == 64)
          attend_in_registers<64>(o, query_heads, keys, values, length, group, float(scaling), scores.data(),
                                  query.data(), acc.data());
        else if (head_dim == 128)
          attend_in_registers<128>(o, query_heads, keys, values, length, group, float(scaling), scores.data(),
                                   query.data(), acc.data());
        else
          attend(o, query_heads, keys, values, length, group, head_dim, float(scaling), scores.data(), query.data(),
                 acc.data());
      }
    }
  });
}

}  // namespace switchcit
