// DeepSeek Sparse Attention on the CPU: fused index scores + exact top-k, gather attention, and the indexer's
// projection of a decode step's tokens; on AVX512-BF16 CPUs also a decode step's bf16 weight products; with AVX2 a
// decode step's int8 weight products and a dense layer's whole decode step (norms, products, RoPE, attention).
// Compiled once per machine by dsarag_kernels/cpu_dsa.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes on float32 or bf16 buffers. PyTorch references: indexer_model.indexer.select_topk,
// indexer_model.dsa.masked_dense_attention_reference, LightningIndexer.project and F.linear; the test is
// tests/test_kernels_cpu_dsa.py.
//
// Why C++: in PyTorch operations the index scores pass over a (queries x keys) tile once per index head and
// the union of a block's selections covers most of the prefix, so DSA did about dense's work at 8K. Here each
// query scores its keys in one fused pass and attends to exactly its own k keys. On CPUs with AVX512-BF16, bf16
// kernels after the float32 ones read the model's bf16 tensors as they are, on AMX tile products where the CPU has
// AMX too.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

// Eight floats in one register (AVX2; half of one on AVX-512; two on SSE / NEON): GCC vector extensions keep
// the accumulators below in registers, where plain arrays were spilled to memory.
typedef float v8 __attribute__((vector_size(32)));

// A plain broadcast: v8{} + x must add 0 first (x may be -0), one more instruction in the scoring loop.
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline v8 max8(v8 a, v8 b) { return a > b ? a : b; }
inline void prefetch_row(const float* row, int dim) {
  for (int i = 0; i < dim; i += 16) __builtin_prefetch(row + i);  // one 64-byte line per 16 floats
}

// e^x lane by lane (Cephes expf: x = n ln2 + r, a polynomial for e^r, 2^n in the exponent bits); relative
// error about 2e-7 in [-87, 88], inputs clamped to it.
inline v8 exp8(v8 x) {
  typedef int i8 __attribute__((vector_size(32)));
  x = max8(x, splat(-87.0f));
  x = x < 88.0f ? x : splat(88.0f);
  const v8 z = x * 1.44269504088896341f + 0.5f;
  v8 n = __builtin_convertvector(__builtin_convertvector(z, i8), v8);
  n = n > z ? n - 1.0f : n;  // floor
  const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

constexpr int kKeyTile = 24;  // keys scored together: three registers per index head, 12 independent sums
constexpr int kHeadGroup = 4;  // index heads summed together (the caller pads to a multiple of it)
constexpr int kQueryBlock = 8;  // queries scored together per key tile
constexpr int kRadixBits = 12;  // top-k threshold buckets: sign, exponent and 3 bits, an eighth of an octave
constexpr int kValueBlock = 64;  // keys whose value rows are weighted together (16 KB of rows: L1)
constexpr int kValuePrefetch = 32;  // value rows asked for this many keys ahead (8 / 16: 1.3x slower, random keys)

// scores[s] = sum_h w[h] * relu(q[h] . k[s]) for the kKeyTile keys of one tile, (dim, kKeyTile) contiguous.
// 12 independent sums (4 heads x 3 key registers) keep both FMA pipes busy: with 16-key tiles (8 sums) this loop ran
// at about half of a float32 matmul's rate, with 24 at three quarters.
void score_tile(const float* q, const float* w, const float* keys, int n_heads, int dim, float* scores) {
  v8 total0{}, total1{}, total2{};
  const v8 zero{};
  for (int h0 = 0; h0 < n_heads; h0 += kHeadGroup) {
    const float *q0 = q + h0 * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
    v8 a0{}, a1{}, a2{}, b0{}, b1{}, b2{}, c0{}, c1{}, c2{}, d0{}, d1{}, d2{};
    for (int i = 0; i < dim; ++i) {
      const float* row = keys + i * kKeyTile;
      const v8 k0 = load8(row), k1 = load8(row + 8), k2 = load8(row + 16);
      v8 x = splat(q0[i]);
      a0 += x * k0, a1 += x * k1, a2 += x * k2;
      x = splat(q1[i]);
      b0 += x * k0, b1 += x * k1, b2 += x * k2;
      x = splat(q2[i]);
      c0 += x * k0, c1 += x * k1, c2 += x * k2;
      x = splat(q3[i]);
      d0 += x * k0, d1 += x * k1, d2 += x * k2;
    }
    const float w0 = w[h0], w1 = w[h0 + 1], w2 = w[h0 + 2], w3 = w[h0 + 3];
    total0 += w0 * max8(a0, zero) + w1 * max8(b0, zero) + w2 * max8(c0, zero) + w3 * max8(d0, zero);
    total1 += w0 * max8(a1, zero) + w1 * max8(b1, zero) + w2 * max8(c1, zero) + w3 * max8(d1, zero);
    total2 += w0 * max8(a2, zero) + w1 * max8(b2, zero) + w2 * max8(c2, zero) + w3 * max8(d2, zero);
  }
  store8(scores, total0);
  store8(scores + 8, total1);
  store8(scores + 16, total2);
}

// The same scores for keys stored as rows (n_keys, dim): the decode path, where laying the whole cache out in
// tiles for one query would cost more than scoring it.
void score_rows(const float* q, const float* w, const float* keys, int n_heads, int dim, int64_t n_keys,
                float* scores) {
  for (int64_t s = 0; s < n_keys; ++s) {
    const float* key = keys + s * dim;
    float total = 0.0f;
    for (int h = 0; h < n_heads; ++h) {
      const float* qh = q + h * dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < dim; ++i) dot += qh[i] * key[i];
      total += w[h] * std::max(dot, 0.0f);
    }
    scores[s] = total;
  }
}

// An order-preserving map of floats to unsigned ints: a larger score gets a larger key.
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Scratch space of one thread's top-k rows.
struct TopkScratch {
  std::vector<uint32_t> counts;  // histogram of the scores' top kRadixBits bits
  std::vector<float> bucket;  // the scores in the bucket that holds the k-th largest
  std::vector<int64_t> kept;  // positions of the scores in that bucket or above, ascending
};

// The best `wanted` of scores[first, last) (0 < wanted <= last - first) as ascending positions into `out`, ties to
// the lowest positions. Two passes over the row: a histogram of the keys' top kRadixBits bits finds the bucket that
// holds the wanted-th largest; the second keeps the positions at or above that bucket (about wanted of them) and the
// bucket's values, and nth_element runs over the bucket alone. Counting the values above the threshold and writing the
// chosen positions then go over the bucket and the kept positions, not the whole row.
int64_t best_positions(const float* scores, int64_t first, int64_t last, int64_t wanted, TopkScratch& scratch,
                       int64_t* out) {
  constexpr int kShift = 32 - kRadixBits;
  std::vector<uint32_t>& counts = scratch.counts;
  counts.assign(size_t{1} << kRadixBits, 0);
  for (int64_t s = first; s < last; ++s) ++counts[order_key(scores[s]) >> kShift];
  int64_t above = 0;  // values in buckets above the one holding the answer
  uint32_t top = (1u << kRadixBits) - 1;
  while (above + counts[top] < wanted) above += counts[top--];
  // Written without branches: about half the row passes at k = 2048 and 8K, and a branch mispredicted often.
  scratch.bucket.resize(last - first);
  scratch.kept.resize(last - first);
  float* bucket = scratch.bucket.data();
  int64_t* kept = scratch.kept.data();
  int64_t n_bucket = 0, n_kept = 0;
  for (int64_t s = first; s < last; ++s) {
    const uint32_t key = order_key(scores[s]) >> kShift;
    kept[n_kept] = s;
    n_kept += key >= top;
    bucket[n_bucket] = scores[s];
    n_bucket += key == top;
  }
  float* kth = bucket + n_bucket - (wanted - above);
  std::nth_element(bucket, kth, bucket + n_bucket);
  const float threshold = *kth;
  int64_t greater = above;
  for (int64_t j = 0; j < n_bucket; ++j) greater += bucket[j] > threshold;
  int64_t ties = wanted - greater;  // ties at the threshold go to the lowest positions
  int64_t filled = 0;
  for (int64_t j = 0; j < n_kept; ++j) {
    const float value = scores[kept[j]];
    if (value > threshold || (value == threshold && ties-- > 0)) out[filled++] = kept[j];
  }
  return filled;
}

// Indices of one query at `position`: sinks, window and the best of the rest, ascending; -1 pads the row.
template <int64_t (*best)(const float*, int64_t, int64_t, int64_t, TopkScratch&, int64_t*) = best_positions>
void select_row(const float* scores, int64_t position, int topk, int n_sink, int window, TopkScratch& scratch,
                int64_t* out) {
  const int64_t n_seen = position + 1;
  int64_t filled = 0;
  if (n_seen <= topk) {  // sees at most k keys: takes them all
    for (int64_t s = 0; s < n_seen; ++s) out[filled++] = s;
  } else {
    const int64_t first = n_sink, last = position - window + 1;  // candidates [first, last)
    const int64_t wanted = topk - n_sink - window;  // 0: sinks and window fill k
    for (int64_t s = 0; s < first; ++s) out[filled++] = s;
    if (wanted > 0) {
      filled += best(scores, first, last, wanted, scratch, out + filled);
    }
    for (int64_t s = last; s <= position; ++s) out[filled++] = s;
  }
  std::fill(out + filled, out + topk, int64_t{-1});
}

// A prefill's selection, run by every thread of a parallel region: the threads take kQueryBlock queries at a time
// and score them tile by tile (score(t, tile, scores): query t's scores of the tile_keys keys of `tile`), so each
// tile is read from memory once for all of them, then keep each query's top-k (select_row).
template <int64_t (*best)(const float*, int64_t, int64_t, int64_t, TopkScratch&, int64_t*) = best_positions,
          typename Score>
void select_blocks(const int64_t* positions, int64_t n_queries, int64_t n_tiles, int tile_keys, int topk, int n_sink,
                   int window, int64_t* out, Score score) {
  const int64_t row = n_tiles * tile_keys;
  std::vector<float> scores(std::min<int64_t>(kQueryBlock, n_queries) * row);  // a decode step: one query's row
  TopkScratch scratch;
#pragma omp for schedule(dynamic, 1)
  for (int64_t t0 = 0; t0 < n_queries; t0 += kQueryBlock) {
    const int64_t t1 = std::min<int64_t>(n_queries, t0 + kQueryBlock);
    const int64_t last = *std::max_element(positions + t0, positions + t1);
    for (int64_t tile = 0; tile * tile_keys <= last; ++tile) {
      for (int64_t t = t0; t < t1; ++t) {
        if (positions[t] + 1 > topk && tile * tile_keys <= positions[t]) {
          score(t, tile, scores.data() + (t - t0) * row + tile * tile_keys);
        }
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      select_row<best>(scores.data() + (t - t0) * row, positions[t], topk, n_sink, window, scratch, out + t * topk);
    }
  }
}

// The indexer's projection of a few new tokens, in float32 or bf16 (uint16_t, the upper half of a float32).
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename Value>
Value narrow(float x);
template <>
float narrow<float>(float x) {
  return x;
}
template <>
uint16_t narrow<uint16_t>(float x) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}
template <typename Value>
float rounded(float x) {  // where PyTorch's bf16 operations hand back a bf16 result
  return widen(narrow<Value>(x));
}
inline v8 load8(const uint16_t* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 half;
  std::memcpy(&half, p, sizeof half);
  const u32x8 bits = __builtin_convertvector(half, u32x8) << 16;
  v8 r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

template <typename Value>
float dot(const float* x, const Value* row, int dim) {
  v8 even = splat(0.0f), odd = splat(0.0f);
  int i = 0;
  for (; i + 16 <= dim; i += 16) {
    even += load8(x + i) * load8(row + i);
    odd += load8(x + i + 8) * load8(row + i + 8);
  }
  const v8 lanes = even + odd;
  float total = 0.0f;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  for (; i < dim; ++i) total += x[i] * widen(row[i]);
  return total;
}

// RoPE on the first 2 * cos.size() dims of a head (half-split layout: dims i and i + half turn together).
template <typename Value>
void rotate_head(const float* in, const std::vector<float>& cos, const std::vector<float>& sin, int head_dim,
                 Value* out) {
  const int half = int(cos.size());
  for (int i = 0; i < half; ++i) {
    out[i] = narrow<Value>(in[i] * cos[i] - in[i + half] * sin[i]);
    out[i + half] = narrow<Value>(in[i + half] * cos[i] + in[i] * sin[i]);
  }
  for (int i = 2 * half; i < head_dim; ++i) out[i] = narrow<Value>(in[i]);
}

// See dsa_index_project below.
template <typename Value>
void index_project(const Value* x, const int64_t* positions, int64_t n_rows, int dim, const Value* wq, const Value* wk,
                   const Value* wp, int n_heads, int head_dim, int n_weights, const Value* norm_weight,
                   const Value* norm_bias, float norm_eps, int rope_dims, float rope_base, float w_scale, Value* q_out,
                   Value* k_out, Value* w_out, int n_threads) {
  const int n_q = n_heads * head_dim, n_out = n_q + head_dim + n_weights;
  std::vector<float> xf(n_rows * dim), projected(n_rows * n_out);
  for (int64_t i = 0; i < n_rows * dim; ++i) xf[i] = widen(x[i]);
  // One pass over the three weight matrices, their rows split between the threads; each row is read once for all
  // the new tokens.
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int j = 0; j < n_out; ++j) {
    const Value* row = j < n_q              ? wq + int64_t(j) * dim
                       : j < n_q + head_dim ? wk + int64_t(j - n_q) * dim
                                            : wp + int64_t(j - n_q - head_dim) * dim;
    for (int64_t r = 0; r < n_rows; ++r) projected[r * n_out + j] = rounded<Value>(dot(xf.data() + r * dim, row, dim));
  }
  std::vector<float> cos(rope_dims / 2), sin(rope_dims / 2);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int i = 0; i < rope_dims / 2; ++i) {  // as indexer.rope_cos_sin computes them, in float32
      const float angle = float(positions[r]) * (1.0f / std::pow(rope_base, float(2 * i) / float(rope_dims)));
      cos[i] = std::cos(angle), sin[i] = std::sin(angle);
    }
    float* q = projected.data() + r * n_out;
    float* k = q + n_q;
    const float* w = k + head_dim;
    float mean = 0.0f, variance = 0.0f;
    for (int i = 0; i < head_dim; ++i) mean += k[i];
    mean /= float(head_dim);
    for (int i = 0; i < head_dim; ++i) variance += (k[i] - mean) * (k[i] - mean);
    const float inverse_std = 1.0f / std::sqrt(variance / float(head_dim) + norm_eps);
    for (int i = 0; i < head_dim; ++i) {
      k[i] = rounded<Value>((k[i] - mean) * inverse_std * widen(norm_weight[i]) + widen(norm_bias[i]));
    }
    for (int h = 0; h < n_heads; ++h) {
      rotate_head(q + h * head_dim, cos, sin, head_dim, q_out + (r * n_heads + h) * head_dim);
    }
    rotate_head(k, cos, sin, head_dim, k_out + r * head_dim);
    for (int j = 0; j < n_weights; ++j) w_out[r * n_weights + j] = narrow<Value>(w[j] * w_scale);
  }
}

// See dsa_rms_norm_rows below.
template <typename Value>
void rms_norm_rows(const Value* x, const Value* weight, float eps, int64_t n_rows, int dim, Value* out) {
  for (int64_t t = 0; t < n_rows; ++t) {
    const Value* row = x + t * dim;
    float squares = 0.0f;
    for (int i = 0; i < dim; ++i) squares += widen(row[i]) * widen(row[i]);
    const float inverse = 1.0f / std::sqrt(squares / float(dim) + eps);
    for (int i = 0; i < dim; ++i) out[t * dim + i] = narrow<Value>(widen(weight[i]) * rounded<Value>(widen(row[i]) * inverse));
  }
}

// See dsa_rope_rows below.
template <typename Value>
void rope_rows(const Value* x, int64_t row_stride, int64_t n_rows, int n_heads, int head_dim, const float* cos,
               const float* sin, Value* out) {
  const int half = head_dim / 2;
  for (int64_t t = 0; t < n_rows; ++t) {
    const float *c = cos + t * head_dim, *s = sin + t * head_dim;
    for (int h = 0; h < n_heads; ++h) {
      const Value* in = x + t * row_stride + h * head_dim;
      Value* o = out + (t * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float first = widen(in[i]), second = widen(in[i + half]);
        o[i] = narrow<Value>(first * c[i] - second * s[i]);
        o[i + half] = narrow<Value>(second * c[i + half] + first * s[i + half]);
      }
    }
  }
}

}  // namespace

extern "C" {

// Top-k selection. q (T, n_heads, dim) and w (T, n_heads), n_heads a multiple of kHeadGroup (zero-weight
// padding); tiles (n_tiles, dim, kKeyTile): the index keys, zero-padded; positions (T,) -> out (T, topk) int64,
// ascending, -1 padding. A thread scores kQueryBlock queries tile by tile, so each tile is read from memory once
// for all of them and from L1 after that (query by query, the scan of the keys was bound by L3 bandwidth).
void dsa_select_topk(const float* q, const float* w, const float* tiles, int64_t n_tiles, const int64_t* positions,
                     int64_t n_queries, int n_heads, int dim, int topk, int n_sink, int window, int64_t* out,
                     int n_threads) {
  auto score = [=](int64_t t, int64_t tile, float* scores) {
    score_tile(q + t * n_heads * dim, w + t * n_heads, tiles + tile * dim * kKeyTile, n_heads, dim, scores);
  };
#pragma omp parallel num_threads(n_threads)
  select_blocks(positions, n_queries, n_tiles, kKeyTile, topk, n_sink, window, out, score);
}

// Top-k selection for a few queries (decode): keys (n_keys, dim) as the index key cache holds them.
void dsa_select_topk_rows(const float* q, const float* w, const float* keys, int64_t n_keys, const int64_t* positions,
                          int64_t n_queries, int n_heads, int dim, int topk, int n_sink, int window, int64_t* out) {
  std::vector<float> scores(n_keys);
  TopkScratch scratch;
  for (int64_t t = 0; t < n_queries; ++t) {
    if (positions[t] + 1 > topk) {
      score_rows(q + t * n_heads * dim, w + t * n_heads, keys, n_heads, dim, positions[t] + 1, scores.data());
    }
    select_row(scores.data(), positions[t], topk, n_sink, window, scratch, out + t * topk);
  }
}

// Gather attention. q (n_q_heads, T, dim); k, v (n_kv_heads, >= keys, dim) with kv_head_stride floats between
// heads; indices (n_sets, T, topk), -1 for unused slots, set s serving kv heads s * n_kv_heads / n_sets ...;
// out (n_q_heads, T, dim); dim a multiple of 8. Kv head h serves query heads h * G ... h * G + G - 1
// (G = n_q_heads / n_kv_heads); up to 8 of them ride in the lanes of one register, so each gathered key and
// value row is read once for all of them and no dot product needs a horizontal sum.
void dsa_sparse_attention(const float* q, const float* k, const float* v, int64_t kv_head_stride,
                          const int64_t* indices, int64_t n_queries, int n_q_heads, int n_kv_heads, int n_sets, int dim,
                          int topk, float scale, float* out, int n_threads) {
  const int group = n_q_heads / n_kv_heads, kv_per_set = n_kv_heads / n_sets;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<v8> q_lanes(dim), out_lanes(dim), probs(topk);
    std::vector<int64_t> keys(topk);
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t t = 0; t < n_queries; ++t) {
      for (int h = 0; h < n_kv_heads; ++h) {
        const int64_t* chosen = indices + ((h / kv_per_set) * n_queries + t) * topk;
        const float* k_head = k + h * kv_head_stride;
        const float* v_head = v + h * kv_head_stride;
        int n = 0;
        for (int j = 0; j < topk; ++j) {
          if (chosen[j] >= 0) keys[n++] = chosen[j];
        }
        for (int g0 = 0; g0 < group; g0 += 8) {
          const int lanes = std::min(8, group - g0);
          auto q_row = [&](int l) { return q + ((h * group + g0 + l) * n_queries + t) * dim; };
          for (int i = 0; i < dim; ++i) {
            v8 lane{};
            for (int l = 0; l < lanes; ++l) lane[l] = q_row(l)[i] * scale;
            q_lanes[i] = lane;
          }
          // Scores, eight keys at a time (eight independent sums keep both FMA pipes busy); lanes past `lanes`
          // score 0 and are dropped.
          v8 best = splat(-INFINITY);
          int j = 0;
          for (; j + 8 <= n; j += 8) {
            const float* r[8];
            for (int u = 0; u < 8; ++u) r[u] = k_head + keys[j + u] * dim;
            if (j + 16 <= n) {  // rows come from all over the cache: ask for the next ones early
              for (int u = 8; u < 16; ++u) prefetch_row(k_head + keys[j + u] * dim, dim);
            }
            v8 s[8] = {};
            for (int i = 0; i < dim; ++i) {
              const v8 qi = q_lanes[i];
              for (int u = 0; u < 8; ++u) s[u] += r[u][i] * qi;
            }
            for (int u = 0; u < 8; ++u) {
              probs[j + u] = s[u];
              best = max8(best, s[u]);
            }
          }
          for (; j < n; ++j) {
            const float* r = k_head + keys[j] * dim;
            v8 s{};
            for (int i = 0; i < dim; ++i) s += r[i] * q_lanes[i];
            probs[j] = s;
            best = max8(best, s);
          }
          v8 total{};
          for (j = 0; j < n; ++j) total += (probs[j] = exp8(probs[j] - best));
          const v8 inverse = 1.0f / total;
          // Weighted values, 8 output dims at a time in 8 registers, over blocks of kValueBlock keys: a block's
          // rows stay in L1 through the dim / 8 passes (one pass over all k rows per 8 dims ran from L2 / L3).
          std::fill(out_lanes.begin(), out_lanes.end(), v8{});
          for (int j0 = 0; j0 < n; j0 += kValueBlock) {
            const int j1 = std::min(n, j0 + kValueBlock);
            for (int i0 = 0; i0 < dim; i0 += 8) {
              v8 o[8];
              std::copy(out_lanes.begin() + i0, out_lanes.begin() + i0 + 8, o);
              for (j = j0; j < j1; ++j) {
                if (i0 == 0 && j + kValuePrefetch < n) prefetch_row(v_head + keys[j + kValuePrefetch] * dim, dim);
                const float* r = v_head + keys[j] * dim + i0;
                const v8 p = probs[j];
                for (int i = 0; i < 8; ++i) o[i] += r[i] * p;
              }
              std::copy(o, o + 8, out_lanes.begin() + i0);
            }
          }
          for (int l = 0; l < lanes; ++l) {
            float* row = out + ((h * group + g0 + l) * n_queries + t) * dim;
            for (int i = 0; i < dim; ++i) row[i] = out_lanes[i][l] * inverse[l];
          }
        }
      }
    }
  }
}

// The lightning indexer's projection of a few new tokens (a decode step), as LightningIndexer.project computes it:
// q = wq x (n_heads heads), k = LayerNorm(wk x), w = wp x * w_scale, then RoPE on the first rope_dims dims of each
// q head and of k. x (n_rows, dim) with positions (n_rows,); wq (n_heads * head_dim, dim), wk (head_dim, dim),
// wp (n_weights, dim) -> q_out (n_rows, n_heads, head_dim), k_out (n_rows, head_dim), w_out (n_rows, n_weights).
// In PyTorch these are about ten calls on tiny tensors, 0.45 ms a layer, as long as the step's selection and
// attention at 8K. The bf16 version rounds where PyTorch's bf16 operations do.
void dsa_index_project(const float* x, const int64_t* positions, int64_t n_rows, int dim, const float* wq,
                       const float* wk, const float* wp, int n_heads, int head_dim, int n_weights,
                       const float* norm_weight, const float* norm_bias, float norm_eps, int rope_dims, float rope_base,
                       float w_scale, float* q_out, float* k_out, float* w_out, int n_threads) {
  index_project(x, positions, n_rows, dim, wq, wk, wp, n_heads, head_dim, n_weights, norm_weight, norm_bias, norm_eps,
                rope_dims, rope_base, w_scale, q_out, k_out, w_out, n_threads);
}

void dsa_index_project_bf16(const uint16_t* x, const int64_t* positions, int64_t n_rows, int dim, const uint16_t* wq,
                            const uint16_t* wk, const uint16_t* wp, int n_heads, int head_dim, int n_weights,
                            const uint16_t* norm_weight, const uint16_t* norm_bias, float norm_eps, int rope_dims,
                            float rope_base, float w_scale, uint16_t* q_out, uint16_t* k_out, uint16_t* w_out,
                            int n_threads) {
  index_project(x, positions, n_rows, dim, wq, wk, wp, n_heads, head_dim, n_weights, norm_weight, norm_bias, norm_eps,
                rope_dims, rope_base, w_scale, q_out, k_out, w_out, n_threads);
}

// A decode step's RMSNorm, as model.rms_norm: x (n_rows, dim) and weight (dim,) in float32 (x_bf16 0) or bf16 (1) ->
// out = weight * (x / sqrt(mean(x^2) + eps)), the normed x rounded to x's dtype first. In PyTorch it is nine calls
// on 896 values, 20-80 us each time (the step's products leave the caches cold); here one.
void dsa_rms_norm_rows(const void* x, const void* weight, float eps, int64_t n_rows, int dim, int x_bf16, void* out) {
  if (x_bf16) {
    rms_norm_rows(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), eps, n_rows, dim,
                  static_cast<uint16_t*>(out));
  } else {
    rms_norm_rows(static_cast<const float*>(x), static_cast<const float*>(weight), eps, n_rows, dim,
                  static_cast<float*>(out));
  }
}

// A decode step's RoPE, as model.apply_rope (half-split layout): x (n_rows, n_heads, head_dim), rows row_stride
// values apart, in float32 (x_bf16 0) or bf16 (1); cos, sin (n_rows, head_dim) float32 -> out (n_rows, n_heads,
// head_dim) contiguous, in x's dtype.
void dsa_rope_rows(const void* x, int64_t row_stride, int64_t n_rows, int n_heads, int head_dim, const float* cos,
                   const float* sin, int x_bf16, void* out) {
  if (x_bf16) {
    rope_rows(static_cast<const uint16_t*>(x), row_stride, n_rows, n_heads, head_dim, cos, sin,
              static_cast<uint16_t*>(out));
  } else {
    rope_rows(static_cast<const float*>(x), row_stride, n_rows, n_heads, head_dim, cos, sin, static_cast<float*>(out));
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// Weight-only int8 products for a decode step (CPUs with AVX2, FMA and F16C; AVX-512 registers where present). A
// decode step reads every weight once for one token, so its time is the bytes read: int8 weights with one fp16
// scale per block of 32 (the GGUF's Q8_0 layout, 1.06 bytes a weight) are half of bf16's and a quarter of float32's.
// With AVX512-VNNI the activations are rounded to int8 per block of 32 as well (llama.cpp's Q8_0 x Q8_0 product):
// one vpdpbusd takes 64 products, and two threads read the weights near memory speed. Without it they are rounded
// to int16 with one scale per row, 2^-16 of the row's largest value (bf16 itself keeps 2^-9 of each), and one
// vpmaddwd takes 32 products.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace {

constexpr int kQ8Block = 32;  // weights per scale
constexpr int kQ8Rows = 4;  // weight rows read together, each x block loaded once for all of them

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int kScaleLanes = 16;  // block scales widened at once
inline __m512 row_scales(const uint16_t* scales, int left) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << std::min(left, kScaleLanes)) - 1), scales));
}
#else
constexpr int kScaleLanes = 8;
inline __m256 row_scales(const uint16_t* scales, int left) {
  uint16_t some[kScaleLanes] = {};
  std::memcpy(some, scales, sizeof(uint16_t) * std::min(left, kScaleLanes));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(some)));
}
inline float reduce8(__m256 x) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int kQ8Chunk = 64;  // bytes of a weight row per vpdpbusd: two blocks

// The rows of x in int8, one scale per block of 32 (max |x| / 127), padded to whole chunks and to whole groups of
// kScaleLanes scales. vpdpbusd multiplies unsigned by signed bytes: the weights are read as w + 128 (sign bit
// flipped), and each int32 lane starts at -128 times the sum of its four x values (`offsets`), which cancels that.
struct RoundedX {
  int chunks, scale_slots;
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int32_t> offsets;

  template <typename Value>
  RoundedX(const Value* x, int64_t n_rows, int k)
      : chunks((k + kQ8Chunk - 1) / kQ8Chunk),
        scale_slots((k / kQ8Block + kScaleLanes - 1) / kScaleLanes * kScaleLanes),
        values(n_rows * chunks * kQ8Chunk, 0),
        scales(n_rows * scale_slots, 0.0f),
        offsets(n_rows * chunks * 16) {
    for (int64_t t = 0; t < n_rows; ++t) {
      for (int b = 0; b < k / kQ8Block; ++b) {
        const Value* block = x + t * k + b * kQ8Block;
        float most = 0.0f;
        for (int i = 0; i < kQ8Block; ++i) most = std::max(most, std::fabs(widen(block[i])));
        scales[t * scale_slots + b] = most / 127.0f;
        const float inverse = most > 0.0f ? 127.0f / most : 0.0f;
        int8_t* out = values.data() + t * chunks * kQ8Chunk + b * kQ8Block;
        for (int i = 0; i < kQ8Block; ++i) out[i] = int8_t(std::lrint(widen(block[i]) * inverse));
      }
      for (int c = 0; c < chunks; ++c) {
        const __m512i lane_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), chunk(t, c));
        const __m512i start = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), lane_sums), 7);
        _mm512_storeu_si512(offsets.data() + (t * chunks + c) * 16, start);
      }
    }
  }
  __m512i chunk(int64_t t, int c) const { return _mm512_loadu_si512(values.data() + (t * chunks + c) * kQ8Chunk); }
  __m512i offset(int64_t t, int c) const { return _mm512_loadu_si512(offsets.data() + (t * chunks + c) * 16); }
};

// sums[r] = x[t] . (scale * q)[r] for `rows` (at most kQ8Rows) consecutive rows of k int8 weights (k a multiple of
// 32): per chunk of two blocks one exact int32 vpdpbusd, then each block's eight lanes weighed by its two scales.
inline void q8_block(const RoundedX& x, int64_t t, const int8_t* q, const uint16_t* scales, int k, int rows,
                     float* sums) {
  const int blocks = k / kQ8Block;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const float* x_scales = x.scales.data() + t * x.scale_slots;
  // The same spot of the next group of rows, into L2: 2 KB ahead in the row was behind the reads of the group's
  // later rows where rows are short (896 bytes); 1.15x faster on one core.
  const int64_t ahead = int64_t(kQ8Rows) * k;
  __m512 acc[kQ8Rows], wide[kQ8Rows];
  for (int r = 0; r < kQ8Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int c = 0; c < x.chunks; ++c) {
    const int b = 2 * c;
    if (b % kScaleLanes == 0) {
      const __m512 xs = _mm512_loadu_ps(x_scales + b);
      for (int r = 0; r < rows; ++r) {
        wide[r] = _mm512_mul_ps(xs, row_scales(scales + int64_t(r) * blocks + b, blocks - b));
      }
    }
    const __m512i xv = x.chunk(t, c), start = x.offset(t, c);
    const __m512i lane = _mm512_add_epi32(halves, _mm512_set1_epi32(b % kScaleLanes));
    const __mmask64 loaded = b + 1 < blocks ? ~__mmask64(0) : __mmask64(0xffffffff);  // an odd last block
    for (int r = 0; r < kQ8Rows; ++r) {
      if (r < rows) {
        const int8_t* p = q + int64_t(r) * k + c * kQ8Chunk;
        _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
        const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(loaded, p), flip);
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, w, xv));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(lane, wide[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}
#else
constexpr int kQ8Ahead = 2048;  // bytes of each weight row prefetched ahead (2 KB, as the bf16 kernel's)

// The rows of x in int16, one scale per row (2^-16 of its largest value).
struct RoundedX {
  int k;
  std::vector<int16_t> values;
  std::vector<float> scales;

  template <typename Value>
  RoundedX(const Value* x, int64_t n_rows, int k) : k(k), values(n_rows * k), scales(n_rows) {
    for (int64_t t = 0; t < n_rows; ++t) {
      float most = 0.0f;
      for (int i = 0; i < k; ++i) most = std::max(most, std::fabs(widen(x[t * k + i])));
      scales[t] = most / 32767.0f;
      const float inverse = most > 0.0f ? 32767.0f / most : 0.0f;
      for (int i = 0; i < k; ++i) values[t * k + i] = int16_t(std::lrint(widen(x[t * k + i]) * inverse));
    }
  }
};

// sums[r] = x[t] . (scale * q)[r] for `rows` (at most kQ8Rows) consecutive rows of k int8 weights (k a multiple of
// 32): per block, vpmaddwd's int32 sums are exact, then widened and weighed by the block's scale.
inline void q8_block(const RoundedX& rounded, int64_t t, const int8_t* q, const uint16_t* scales, int k, int rows,
                     float* sums) {
  const int16_t* x = rounded.values.data() + t * k;
  const int blocks = k / kQ8Block;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 acc[kQ8Rows], wide[kQ8Rows];
  for (int r = 0; r < kQ8Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int b = 0; b < blocks; ++b) {
    if (b % kScaleLanes == 0) {
      for (int r = 0; r < rows; ++r) wide[r] = row_scales(scales + int64_t(r) * blocks + b, blocks - b);
    }
    const __m512i xv = _mm512_loadu_si512(x + b * kQ8Block);
    const __m512i lane = _mm512_set1_epi32(b % kScaleLanes);
    for (int r = 0; r < kQ8Rows; ++r) {
      if (r < rows) {
        const int8_t* p = q + int64_t(r) * k + b * kQ8Block;
        if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p + kQ8Ahead), _MM_HINT_T0);
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_madd_epi16(xv, w));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(lane, wide[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]) * rounded.scales[t];
#else
  __m256 acc[kQ8Rows], wide[kQ8Rows];
  for (int r = 0; r < kQ8Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int b = 0; b < blocks; ++b) {
    if (b % kScaleLanes == 0) {
      for (int r = 0; r < rows; ++r) wide[r] = row_scales(scales + int64_t(r) * blocks + b, blocks - b);
    }
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQ8Block));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQ8Block + 16));
    const __m256i lane = _mm256_set1_epi32(b % kScaleLanes);
    for (int r = 0; r < kQ8Rows; ++r) {
      if (r < rows) {
        const int8_t* p = q + int64_t(r) * k + b * kQ8Block;
        if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p + kQ8Ahead), _MM_HINT_T0);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(x0, w0), _mm256_madd_epi16(x1, w1));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(wide[r], lane), acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) sums[r] = reduce8(acc[r]) * rounded.scales[t];
#endif
}
#endif  // AVX512-VNNI

// out = x q^T (+ bias), or with `gated` (q the gate's rows, then the up projection's: n = 2 * width) out =
// silu(x gate^T) * (x up^T), width wide: one parallel region for an MLP's two products and its activation.
template <typename Value>
void linear_rows_int8(const Value* x, const int8_t* q, const uint16_t* scales, const Value* bias, int64_t n_rows,
                      int64_t n, int k, bool gated, Value* out, int n_threads) {
  const RoundedX rounded(x, n_rows, k);
  const int64_t blocks = k / kQ8Block;
  const int64_t width = gated ? n / 2 : n;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t j0 = 0; j0 < width; j0 += kQ8Rows) {
    const int rows = int(std::min<int64_t>(kQ8Rows, width - j0));
    float sums[kQ8Rows], up[kQ8Rows];
    for (int64_t t = 0; t < n_rows; ++t) {
      q8_block(rounded, t, q + j0 * k, scales + j0 * blocks, k, rows, sums);
      if (gated) {
        q8_block(rounded, t, q + (width + j0) * k, scales + (width + j0) * blocks, k, rows, up);
        for (int r = 0; r < rows; ++r) out[t * width + j0 + r] = narrow<Value>(sums[r] / (1.0f + std::exp(-sums[r])) * up[r]);
        continue;
      }
      for (int r = 0; r < rows; ++r) {
        out[t * n + j0 + r] = narrow<Value>(sums[r] + (bias ? widen(bias[j0 + r]) : 0.0f));
      }
    }
  }
}

// out[j] = x . (scale * q)[j] for the n rows of q, shared among the calling team (an orphaned omp for), then
// done(j) for each row the thread computed.
template <typename Done = void (*)(int64_t)>
void team_product(const RoundedX& x, const int8_t* q, const uint16_t* scales, int64_t n, int k, float* out,
                  Done done = [](int64_t) {}) {
  const int64_t blocks = k / kQ8Block;
#pragma omp for schedule(static)
  for (int64_t j0 = 0; j0 < n; j0 += kQ8Rows) {
    const int rows = int(std::min<int64_t>(kQ8Rows, n - j0));
    q8_block(x, 0, q + j0 * k, scales + j0 * blocks, k, rows, out + j0);
    for (int r = 0; r < rows; ++r) done(j0 + r);
  }
}

// act = silu(x gate^T) * (x up^T) for q = gate's `width` rows then up's, shared among the calling team.
template <typename Value>
void team_gated(const RoundedX& x, const int8_t* q, const uint16_t* scales, int64_t width, int k, Value* act) {
  const int64_t blocks = k / kQ8Block;
#pragma omp for schedule(static)
  for (int64_t j0 = 0; j0 < width; j0 += kQ8Rows) {
    const int rows = int(std::min<int64_t>(kQ8Rows, width - j0));
    float gate[kQ8Rows], up[kQ8Rows];
    q8_block(x, 0, q + j0 * k, scales + j0 * blocks, k, rows, gate);
    q8_block(x, 0, q + (width + j0) * k, scales + (width + j0) * blocks, k, rows, up);
    for (int r = 0; r < rows; ++r) act[j0 + r] = narrow<Value>(gate[r] / (1.0f + std::exp(-gate[r])) * up[r]);
  }
}

// Lane u = the sum of s[u]'s lanes, for eight registers: three rounds of pairwise shuffles and adds.
inline v8 fold8(const v8* s) {
  typedef int mask8 __attribute__((vector_size(32)));
  const mask8 even{0, 8, 2, 10, 4, 12, 6, 14}, odd{1, 9, 3, 11, 5, 13, 7, 15};
  const mask8 low_pairs{0, 1, 8, 9, 4, 5, 12, 13}, high_pairs{2, 3, 10, 11, 6, 7, 14, 15};
  const mask8 low_half{0, 1, 2, 3, 8, 9, 10, 11}, high_half{4, 5, 6, 7, 12, 13, 14, 15};
  v8 pairs[4], quads[2];
  for (int u = 0; u < 4; ++u) {
    pairs[u] = __builtin_shuffle(s[2 * u], s[2 * u + 1], even) + __builtin_shuffle(s[2 * u], s[2 * u + 1], odd);
  }
  for (int u = 0; u < 2; ++u) {
    quads[u] = __builtin_shuffle(pairs[2 * u], pairs[2 * u + 1], low_pairs) +
               __builtin_shuffle(pairs[2 * u], pairs[2 * u + 1], high_pairs);
  }
  return __builtin_shuffle(quads[0], quads[1], low_half) + __builtin_shuffle(quads[0], quads[1], high_half);
}

// One query head over a cache's first n_keys rows: softmax(q k^T * scale) v, in float32, out in Value.
template <typename Value>
void attend_one(const Value* q, const Value* keys, const Value* values, int64_t n_keys, int head_dim, float scale,
                float* scores, Value* out) {
  float query[256];
  for (int i = 0; i < head_dim; ++i) query[i] = widen(q[i]) * scale;
  // Eight keys at a time, their sums folded into one register's lanes (no horizontal sum per key).
  v8 most = splat(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n_keys; j += 8) {
    v8 s[8] = {};
    for (int i = 0; i < head_dim; i += 8) {
      const v8 qi = load8(query + i);
      for (int u = 0; u < 8; ++u) s[u] += load8(keys + (j + u) * head_dim + i) * qi;
    }
    const v8 lanes = fold8(s);
    store8(scores + j, lanes);
    most = max8(most, lanes);
  }
  float best = -INFINITY;
  for (int l = 0; l < 8; ++l) best = std::max(best, most[l]);
  for (; j < n_keys; ++j) best = std::max(best, scores[j] = dot(query, keys + j * head_dim, head_dim));
  v8 sums{};
  j = 0;
  for (; j + 8 <= n_keys; j += 8) {
    const v8 p = exp8(load8(scores + j) - best);
    store8(scores + j, p);
    sums += p;
  }
  float total = 0.0f;
  for (int l = 0; l < 8; ++l) total += sums[l];
  for (; j < n_keys; ++j) total += (scores[j] = std::exp(scores[j] - best));
  v8 acc[32] = {};
  for (j = 0; j < n_keys; ++j) {
    const v8 p = splat(scores[j]);
    for (int i = 0; i < head_dim; i += 8) acc[i / 8] += load8(values + j * head_dim + i) * p;
  }
  for (int i = 0; i < head_dim; ++i) out[i] = narrow<Value>(acc[i / 8][i % 8] / total);
}

// One token through a dense decoder layer of the Qwen2 / Llama block (model.Block) at `position`, all of it in one
// parallel region: norm, q/k/v product (+ bias), RoPE, the caches' new row, attention, o product + residual, norm,
// gate/up product with silu, down product + residual; x (dim,) is updated in place. A decode step in PyTorch calls
// about 60 operations a layer between the products, 20-80 us each on a core whose caches the products just
// flushed; here they are a few loops. Each thread rounds every product's x itself (a few thousand values), so the
// threads meet only where one product needs all of another's rows: six barriers a layer. Every intermediate is
// rounded to Value where the PyTorch path rounds it.
template <typename Value>
void decode_layer_int8(Value* x, int dim, const Value* attention_norm, const Value* ffn_norm, float eps,
                       const int8_t* qkv_q, const uint16_t* qkv_scales, const Value* qkv_bias, int n_heads,
                       int n_kv_heads, int head_dim, const float* cos, const float* sin, Value* k_cache,
                       Value* v_cache, int64_t head_stride, int64_t position, const int8_t* o_q,
                       const uint16_t* o_scales, const int8_t* gate_up_q, const uint16_t* gate_up_scales, int hidden,
                       const int8_t* down_q, const uint16_t* down_scales, int n_threads) {
  const int n_q = n_heads * head_dim, n_kv = n_kv_heads * head_dim, n_qkv = n_q + 2 * n_kv;
  const int group = n_heads / n_kv_heads;
  const int64_t n_keys = position + 1;
  const float scale = 1.0f / std::sqrt(float(head_dim));
  std::vector<Value> q(n_q), y(n_q), act(hidden);
  std::vector<float> projected(std::max(n_qkv, dim)), scores(n_heads * n_keys);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<Value> normed(dim), h(dim);
    rms_norm_rows(x, attention_norm, eps, 1, dim, normed.data());
    team_product(RoundedX(normed.data(), 1, dim), qkv_q, qkv_scales, n_qkv, dim, projected.data());
#pragma omp single
    {
      std::vector<Value> qkv(n_qkv), k(n_kv);
      for (int j = 0; j < n_qkv; ++j) qkv[j] = narrow<Value>(projected[j] + (qkv_bias ? widen(qkv_bias[j]) : 0.0f));
      rope_rows(qkv.data(), n_qkv, 1, n_heads, head_dim, cos, sin, q.data());
      rope_rows(qkv.data() + n_q, n_qkv, 1, n_kv_heads, head_dim, cos, sin, k.data());
      for (int g = 0; g < n_kv_heads; ++g) {
        std::copy_n(k.data() + g * head_dim, head_dim, k_cache + g * head_stride + position * head_dim);
        std::copy_n(qkv.data() + n_q + n_kv + g * head_dim, head_dim, v_cache + g * head_stride + position * head_dim);
      }
    }
#pragma omp for schedule(static)
    for (int head = 0; head < n_heads; ++head) {
      const int64_t at = (head / group) * head_stride;
      attend_one(q.data() + head * head_dim, k_cache + at, v_cache + at, n_keys, head_dim, scale,
                 scores.data() + head * n_keys, y.data() + head * head_dim);
    }
    team_product(RoundedX(y.data(), 1, n_q), o_q, o_scales, dim, n_q, projected.data());
    for (int i = 0; i < dim; ++i) h[i] = narrow<Value>(widen(x[i]) + rounded<Value>(projected[i]));
    rms_norm_rows(h.data(), ffn_norm, eps, 1, dim, normed.data());
    team_gated(RoundedX(normed.data(), 1, dim), gate_up_q, gate_up_scales, hidden, dim, act.data());
    // The residual lands row by row: x is read above only, before gate/up's barrier.
    team_product(RoundedX(act.data(), 1, hidden), down_q, down_scales, dim, hidden, projected.data(),
                 [&](int64_t j) { x[j] = narrow<Value>(widen(h[j]) + rounded<Value>(projected[j])); });
  }
}

}  // namespace

extern "C" {

// See decode_layer_int8 above: x (dim,), norm weights, bias, caches (n_kv_heads, head_stride) in float32 (x_bf16 0)
// or bf16 (1); stacked int8 weights as dsa_linear_rows_int8 takes them; cos, sin (head_dim,) float32.
void dsa_decode_layer_int8(void* x, int dim, const void* attention_norm, const void* ffn_norm, float eps,
                           const int8_t* qkv_q, const uint16_t* qkv_scales, const void* qkv_bias, int n_heads,
                           int n_kv_heads, int head_dim, const float* cos, const float* sin, void* k_cache,
                           void* v_cache, int64_t head_stride, int64_t position, const int8_t* o_q,
                           const uint16_t* o_scales, const int8_t* gate_up_q, const uint16_t* gate_up_scales,
                           int hidden, const int8_t* down_q, const uint16_t* down_scales, int x_bf16, int n_threads) {
  if (x_bf16) {
    using V = uint16_t;
    decode_layer_int8(static_cast<V*>(x), dim, static_cast<const V*>(attention_norm), static_cast<const V*>(ffn_norm),
                      eps, qkv_q, qkv_scales, static_cast<const V*>(qkv_bias), n_heads, n_kv_heads, head_dim, cos,
                      sin, static_cast<V*>(k_cache), static_cast<V*>(v_cache), head_stride, position, o_q, o_scales,
                      gate_up_q, gate_up_scales, hidden, down_q, down_scales, n_threads);
  } else {
    using V = float;
    decode_layer_int8(static_cast<V*>(x), dim, static_cast<const V*>(attention_norm), static_cast<const V*>(ffn_norm),
                      eps, qkv_q, qkv_scales, static_cast<const V*>(qkv_bias), n_heads, n_kv_heads, head_dim, cos,
                      sin, static_cast<V*>(k_cache), static_cast<V*>(v_cache), head_stride, position, o_q, o_scales,
                      gate_up_q, gate_up_scales, hidden, down_q, down_scales, n_threads);
  }
}

// F.linear(x, scale * q, bias) for the few rows of a decode step: x (n_rows, k) and bias (n,) or none in float32
// (x_bf16 0) or bf16 (1), q (n, k) int8, scales (n, k / 32) fp16 -> out (n_rows, n) in x's dtype; k a multiple of
// 32. With `gated` (no bias) q stacks an MLP's gate and up weights and out (n_rows, n / 2) = silu(gate) * up. The
// threads split the weight rows; kQ8Rows rows are read from memory once for every row of x.
void dsa_linear_rows_int8(const void* x, const int8_t* q, const uint16_t* scales, const void* bias, int64_t n_rows,
                          int64_t n, int k, int x_bf16, int gated, void* out, int n_threads) {
  if (x_bf16) {
    linear_rows_int8(static_cast<const uint16_t*>(x), q, scales, static_cast<const uint16_t*>(bias), n_rows, n, k,
                     gated != 0, static_cast<uint16_t*>(out), n_threads);
  } else {
    linear_rows_int8(static_cast<const float*>(x), q, scales, static_cast<const float*>(bias), n_rows, n, k,
                     gated != 0, static_cast<float*>(out), n_threads);
  }
}

// Whether x is rounded to int8 per block of 32 (AVX512-VNNI), else to int16 per row.
int dsa_int8_rounds_x_per_block() {
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

// The int8 copy of a weight (n, k) in float32 (w_bf16 0) or bf16 (1), k a multiple of 32: per block of 32, scale =
// max |w| / 127 rounded to fp16 and q = round(w * (1 / scale)), clamped to +-127 (0 for a block of zeros), as
// cpu_dsa.quantize_int8_reference does.
void dsa_quantize_int8(const void* w, int w_bf16, int64_t n, int k, int8_t* q, uint16_t* scales, int n_threads) {
  const int64_t n_blocks = n * (k / kQ8Block);
  const __m256 sign = _mm256_set1_ps(-0.0f), top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m256 values[kQ8Block / 8];
    for (int i = 0; i < kQ8Block / 8; ++i) {
      const int64_t at = b * kQ8Block + 8 * i;
      values[i] = w_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                               _mm256_cvtepu16_epi32(_mm_loadu_si128(
                                   reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + at))),
                               16))
                         : _mm256_loadu_ps(static_cast<const float*>(w) + at);
    }
    __m256 most = _mm256_andnot_ps(sign, values[0]);
    for (int i = 1; i < kQ8Block / 8; ++i) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, values[i]));
    float lanes[8];
    _mm256_storeu_ps(lanes, most);
    const float largest = *std::max_element(lanes, lanes + 8);
    scales[b] = _cvtss_sh(largest / 127.0f, _MM_FROUND_TO_NEAREST_INT);
    const float scale = _cvtsh_ss(scales[b]);
    const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    for (int i = 0; i < kQ8Block / 8; ++i) {  // rounded to nearest even, as torch.round
      const __m256 level = _mm256_max_ps(bottom, _mm256_min_ps(top, _mm256_mul_ps(values[i], inverse)));
      int32_t levels[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels), _mm256_cvtps_epi32(level));
      for (int l = 0; l < 8; ++l) q[b * kQ8Block + 8 * i + l] = int8_t(levels[l]);
    }
  }
}

}  // extern "C"
#endif  // AVX2, FMA, F16C

// ---------------------------------------------------------------------------------------------------------------
// bf16 kernels for CPUs with AVX512-BF16 (built where -march=native enables it; elsewhere the symbols are absent and
// cpu_dsa.py keeps the float32 kernels above). On such CPUs the model runs in bf16: these kernels read its bf16
// tensors as they are, with no float32 copy, and one AVX512-BF16 instruction takes 32 products where a float32 FMA
// takes 16. Products of bf16 values are exact in float32 and sums accumulate in float32, so the index scores equal
// the float32 kernel's up to the order of the sums. Also here: a decode step's bf16 weight products.
#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int kTileRows = 16;  // an AMX tile: 16 rows of 64 bytes (32 bf16 or 16 float32)
constexpr int kTileDims = 32;  // bf16 values per tile row: the depth of one tile product
constexpr int kHeadDim = 64;  // the AMX gather attention's head size (attend_rows takes 64 or 128)

inline v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store16(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

// Interleave two rows of 32 bf16 values a, b as (a0, b0, a1, b1, ...): the first and the second 16 pairs.
const __m512i kLowPairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                           37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
const __m512i kHighPairs = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                            22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);

// Transposes 16 rows of 16 32-bit values in registers: 2 x 2, then 4 x 4 blocks within each 128-bit lane, then
// the lanes.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // u[4G + j], lane L holds element 4L + j of rows 4G ... 4G + 3
    const __m512i even = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), odd = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i even2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i odd2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(even, even2, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(even, even2, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(odd, odd2, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(odd, odd2, 0xDD);
  }
}

// 16 keys as AMX B tiles, one per 32 dims: tile c, row r holds dims c*32 + 2r and c*32 + 2r + 1 of the 16 keys,
// pair by pair. rows[n]: key n's `dim` bf16 values, or nullptr for a padding key (0).
inline void pack_key_tile(const uint16_t* const rows[kTileRows], int dim, uint32_t* tiles) {
  for (int c = 0; c < dim / kTileDims; ++c) {
    __m512i pairs[kTileRows];
    for (int n = 0; n < kTileRows; ++n) {
      pairs[n] = rows[n] ? _mm512_loadu_si512(rows[n] + c * kTileDims) : _mm512_setzero_si512();
    }
    transpose16(pairs);
    for (int r = 0; r < kTileRows; ++r) _mm512_storeu_si512(tiles + (c * kTileRows + r) * kTileRows, pairs[r]);
  }
}

// All n_keys rows as tiles of 16 keys (pack_key_tile), (n_tiles, dim / 2, 16) dim pairs, zero past the last key.
// Called by every thread of a parallel region: they split the tiles, and the loop's barrier lets none read the
// tiles before all are packed.
void pack_keys(const uint16_t* keys, int64_t n_keys, int dim, uint32_t* packed) {
  const int64_t n_tiles = (n_keys + kTileRows - 1) / kTileRows;
#pragma omp for
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const uint16_t* rows[kTileRows];
    for (int n = 0; n < kTileRows; ++n) {
      const int64_t s = tile * kTileRows + n;
      rows[n] = s < n_keys ? keys + s * dim : nullptr;
    }
    pack_key_tile(rows, dim, packed + tile * (dim / 2) * kTileRows);
  }
}

// e^x for probabilities that are rounded to bf16 (relative error 4e-3) right after: relative error below 1e-4.
// x = (n + f) ln 2 with |f| <= 1/2, a quartic for 2^f, vscalefps for 2^n; x is finite.
inline __m512 exp_bf16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.0096181f), f, _mm512_set1_ps(0.0555041f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.2402265f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931472f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

constexpr int kPivots = 7;  // thresholds counted per pass over a row: 8 intervals
constexpr int64_t kFewCandidates = 256;  // the interval holding the k-th score is sorted out once this small

// best_positions with AVX-512 (same result: ascending, ties to the lowest positions), without its scalar
// histogram: each pass counts the scores at or above 7 thresholds spread over the interval known to hold the
// wanted-th largest score, 16 scores per compare, and keeps the one of 8 sub-intervals that holds it. Once at
// most kFewCandidates scores lie in that interval, nth_element over them gives the exact threshold.
int64_t best_positions_wide(const float* scores, int64_t first, int64_t last, int64_t wanted, TopkScratch& scratch,
                            int64_t* out) {
  const float* x = scores + first;
  const int64_t n = last - first;
  auto tail = [n](int64_t i) { return n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1); };
  __m512 low_v = _mm512_set1_ps(INFINITY), high_v = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(i), x + i);
    low_v = _mm512_mask_min_ps(low_v, tail(i), low_v, v);
    high_v = _mm512_mask_max_ps(high_v, tail(i), high_v, v);
  }
  // The wanted-th largest lies in [low, high): at least `wanted` scores are >= low, fewer than `wanted` >= high.
  float low = _mm512_reduce_min_ps(low_v), high = std::nextafter(_mm512_reduce_max_ps(high_v), INFINITY);
  int64_t at_low = n, at_high = 0;
  while (at_low - at_high > kFewCandidates) {
    float pivots[kPivots];
    __m512 pivot_v[kPivots];
    for (int j = 0; j < kPivots; ++j) {
      pivots[j] = low + (high - low) * float(j + 1) / float(kPivots + 1);
      pivot_v[j] = _mm512_set1_ps(pivots[j]);
    }
    if (!(pivots[0] > low) || !(pivots[kPivots - 1] < high)) break;  // the interval is a few floats wide
    int64_t counts[kPivots] = {};
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(tail(i), x + i);
      for (int j = 0; j < kPivots; ++j) {
        counts[j] += __builtin_popcount(_mm512_mask_cmp_ps_mask(tail(i), v, pivot_v[j], _CMP_GE_OQ));
      }
    }
    int j = 0;
    while (j < kPivots && counts[j] >= wanted) ++j;  // pivots below j keep >= wanted scores
    if (j > 0) low = pivots[j - 1], at_low = counts[j - 1];
    if (j < kPivots) high = pivots[j], at_high = counts[j];
  }
  const __m512 low_b = _mm512_set1_ps(low), high_b = _mm512_set1_ps(high);
  scratch.bucket.resize(at_low - at_high + 16);
  float* bucket = scratch.bucket.data();
  int64_t n_bucket = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(i), x + i);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(tail(i), v, low_b, _CMP_GE_OQ) &
                         _mm512_mask_cmp_ps_mask(tail(i), v, high_b, _CMP_LT_OQ);
    _mm512_storeu_ps(bucket + n_bucket, _mm512_maskz_compress_ps(in, v));
    n_bucket += __builtin_popcount(in);
  }
  if (n_bucket < wanted - at_high) return best_positions(scores, first, last, wanted, scratch, out);  // NaN scores
  float* kth = bucket + n_bucket - (wanted - at_high);
  std::nth_element(bucket, kth, bucket + n_bucket);
  const float threshold = *kth;
  int64_t ties = wanted - at_high;  // ties at the threshold go to the lowest positions
  for (int64_t j = 0; j < n_bucket; ++j) ties -= bucket[j] > threshold;
  const __m512 threshold_v = _mm512_set1_ps(threshold);
  scratch.kept.resize(wanted + 16);
  int64_t* kept = scratch.kept.data();
  int64_t filled = 0;
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(i), x + i);
    __mmask16 chosen = _mm512_mask_cmp_ps_mask(tail(i), v, threshold_v, _CMP_GT_OQ);
    for (__mmask16 equal = _mm512_mask_cmp_ps_mask(tail(i), v, threshold_v, _CMP_EQ_OQ); equal && ties > 0; --ties) {
      const __mmask16 lowest = equal & -equal;
      chosen |= lowest, equal ^= lowest;
    }
    const __m512i positions = _mm512_add_epi64(lanes, _mm512_set1_epi64(first + i));
    const __mmask8 below = __mmask8(chosen), above = __mmask8(chosen >> 8);
    _mm512_storeu_si512(kept + filled, _mm512_maskz_compress_epi64(below, positions));
    filled += __builtin_popcount(below);
    _mm512_storeu_si512(kept + filled,
                        _mm512_maskz_compress_epi64(above, _mm512_add_epi64(positions, _mm512_set1_epi64(8))));
    filled += __builtin_popcount(above);
  }
  std::memcpy(out, kept, filled * sizeof(int64_t));
  return filled;
}

template <int kDim = kHeadDim>
inline void prefetch_bf16_row(const uint16_t* row) {  // kDim bf16 values: one 64-byte line per 32
  for (int line = 0; line < kDim; line += 32) __builtin_prefetch(row + line);
}

// sum_h w[h] * relu(q[h] . key) for the 16 keys of one packed tile (pack_key_tile: dim / 2 rows of 16 dim pairs),
// n_heads a multiple of kHeadGroup. Two sums per index head, over the first and the second half of the dim pairs:
// 8 independent chains of dot products hide each one's latency, and each tile row read serves 4 of them.
inline __m512 score_tile_bf16(const uint16_t* q, const float* w, const uint32_t* tile, int n_heads, int dim) {
  const int half = dim / 4;  // dim pairs per half
  __m512 total = _mm512_setzero_ps();
  for (int h0 = 0; h0 < n_heads; h0 += kHeadGroup) {
    __m512 sums[2][kHeadGroup] = {};
    for (int i = 0; i < half; ++i) {
      const __m512bh first = (__m512bh)_mm512_loadu_si512(tile + i * kTileRows);
      const __m512bh second = (__m512bh)_mm512_loadu_si512(tile + (i + half) * kTileRows);
      for (int h = 0; h < kHeadGroup; ++h) {
        int32_t a, b;
        std::memcpy(&a, q + (h0 + h) * dim + 2 * i, sizeof a);
        std::memcpy(&b, q + (h0 + h) * dim + 2 * (i + half), sizeof b);
        sums[0][h] = _mm512_dpbf16_ps(sums[0][h], (__m512bh)_mm512_set1_epi32(a), first);
        sums[1][h] = _mm512_dpbf16_ps(sums[1][h], (__m512bh)_mm512_set1_epi32(b), second);
      }
    }
    for (int h = 0; h < kHeadGroup; ++h) {
      const __m512 dot = _mm512_add_ps(sums[0][h], sums[1][h]);
      total = _mm512_fmadd_ps(_mm512_set1_ps(w[h0 + h]), _mm512_max_ps(dot, _mm512_setzero_ps()), total);
    }
  }
  return total;
}

// attend_rows lays a group of query heads out in the 16 lanes of a register, kLanes lanes per head: each lane takes
// its own dim pair of the head, and a key's kLanes consecutive dim pairs are broadcast to every head's lanes. With 7
// heads per kv head (the default model), one lane per head left 9 of 16 idle; two per head use 14.
template <int kLanes>
inline __m512i broadcast_pairs(const uint16_t* pairs) {
  if constexpr (kLanes == 1) {
    int32_t x;
    std::memcpy(&x, pairs, sizeof x);
    return _mm512_set1_epi32(x);
  } else if constexpr (kLanes == 2) {
    int64_t x;
    std::memcpy(&x, pairs, sizeof x);
    return _mm512_set1_epi64(x);
  } else if constexpr (kLanes == 4) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs)));
  } else if constexpr (kLanes == 8) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs)));
  } else {
    return _mm512_loadu_si512(pairs);
  }
}

// Each group of kLanes neighbouring lanes summed, the sum in all of them (lanes l and l ^ step add alike).
template <int kLanes>
inline __m512 sum_lane_groups(__m512 x) {
  if constexpr (kLanes >= 2) x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
  if constexpr (kLanes >= 4) x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));
  if constexpr (kLanes >= 8) x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  if constexpr (kLanes >= 16) x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  return x;
}

// The gather attention of one query and one kv head (see dsa_sparse_attention_rows_bf16): the group's query heads
// ride in the lanes of a register, so a selected key or value row is read once for all of them. q_lanes[i]: lane
// g * kLanes + o holds dim pair i * kLanes + o of query head g. The probabilities are rounded to bf16, as bf16 SDPA
// rounds them, so that the values are weighed two keys per AVX512-BF16 product. probs: room for (n, 16) floats.
template <int kDim, int kLanes>
void attend_rows(const __m512i q_lanes[kDim / 2 / kLanes], const uint16_t* k_head, const uint16_t* v_head,
                 const int64_t* keys, int n, float scale, int group, float* const out[kTileRows], float* probs) {
  constexpr int kKeys = 8;  // keys scored together: independent sums hide the dot products' latency
  constexpr int kAhead = 16;  // rows come from all over the cache: ask for them this many keys early
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int j0 = 0; j0 < n; j0 += kKeys) {
    const uint16_t* rows[kKeys];
    for (int u = 0; u < kKeys; ++u) rows[u] = k_head + keys[std::min(j0 + u, n - 1)] * kDim;
    for (int u = 0; u < kKeys && j0 + kAhead + u < n; ++u) {
      prefetch_bf16_row<kDim>(k_head + keys[j0 + kAhead + u] * kDim);
    }
    __m512 sums[kKeys] = {};
    for (int i = 0; i < kDim / 2 / kLanes; ++i) {
      for (int u = 0; u < kKeys; ++u) {
        const __m512bh key = (__m512bh)broadcast_pairs<kLanes>(rows[u] + 2 * kLanes * i);
        sums[u] = _mm512_dpbf16_ps(sums[u], key, (__m512bh)q_lanes[i]);
      }
    }
    for (int u = 0; u < kKeys && j0 + u < n; ++u) {
      const __m512 score = _mm512_mul_ps(sum_lane_groups<kLanes>(sums[u]), _mm512_set1_ps(scale));
      _mm512_storeu_ps(probs + (j0 + u) * kTileRows, score);
      best = _mm512_max_ps(best, score);
    }
  }
  // Keys j and j + 1 as one bf16 pair per lane, written over the scores of key j / 2 (already read).
  uint32_t* prob_pairs = reinterpret_cast<uint32_t*>(probs);
  __m512 total = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 2) {
    const __m512 first = exp_bf16(_mm512_sub_ps(_mm512_loadu_ps(probs + j * kTileRows), best));
    const __m512 second = j + 1 < n ? exp_bf16(_mm512_sub_ps(_mm512_loadu_ps(probs + (j + 1) * kTileRows), best))
                                    : _mm512_setzero_ps();
    total = _mm512_add_ps(total, _mm512_add_ps(first, second));
    const __m512i a = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(first));
    const __m512i b = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(second));
    _mm512_storeu_si512(prob_pairs + j / 2 * kTileRows, _mm512_permutex2var_epi16(a, kLowPairs, b));
  }
  alignas(64) float inverse[kTileRows];
  _mm512_store_ps(inverse, _mm512_div_ps(_mm512_set1_ps(1.0f), total));
  // Each pass weighs 32 dims of the value rows (a 64-byte line) for up to 8 query heads: 16 sums in registers.
  constexpr int kPassHeads = std::min(8, kTileRows / kLanes);
  for (int g0 = 0; g0 < group; g0 += kPassHeads) {
    for (int chunk = 0; chunk < kDim; chunk += 32) {
      __m512 sums[kPassHeads][2] = {};
      for (int j = 0; j < n; j += 2) {
        const __m512i a = _mm512_loadu_si512(v_head + keys[j] * kDim + chunk);
        const __m512i b = _mm512_loadu_si512(v_head + keys[std::min(j + 1, n - 1)] * kDim + chunk);
        for (int u = 0; u < 2 && j + kAhead + u < n; ++u) {
          __builtin_prefetch(v_head + keys[j + kAhead + u] * kDim + chunk);
        }
        const __m512bh low = (__m512bh)_mm512_permutex2var_epi16(a, kLowPairs, b);
        const __m512bh high = (__m512bh)_mm512_permutex2var_epi16(a, kHighPairs, b);
        for (int g = 0; g < kPassHeads; ++g) {
          const __m512bh weight = (__m512bh)_mm512_set1_epi32(prob_pairs[j / 2 * kTileRows + (g0 + g) * kLanes]);
          sums[g][0] = _mm512_dpbf16_ps(sums[g][0], low, weight);
          sums[g][1] = _mm512_dpbf16_ps(sums[g][1], high, weight);
        }
      }
      for (int g = 0; g < kPassHeads && g0 + g < group; ++g) {
        const __m512 inverse_g = _mm512_set1_ps(inverse[(g0 + g) * kLanes]);
        _mm512_storeu_ps(out[g0 + g] + chunk, _mm512_mul_ps(sums[g][0], inverse_g));
        _mm512_storeu_ps(out[g0 + g] + chunk + 16, _mm512_mul_ps(sums[g][1], inverse_g));
      }
    }
  }
}

// attend_rows for the `group` query heads whose rows start at q_row, q_head_stride values apart: lays them out in
// the lanes of kDim / 2 / kLanes registers first.
template <int kDim, int kLanes>
void attend_query(const uint16_t* q_row, int64_t q_head_stride, const uint16_t* k_head, const uint16_t* v_head,
                  const int64_t* keys, int n, float scale, int group, float* const out[kTileRows], float* probs) {
  constexpr int kVectors = kDim / 2 / kLanes;
  alignas(64) uint32_t lanes[kVectors][kTileRows] = {};
  for (int g = 0; g < group; ++g) {
    for (int i = 0; i < kDim / 2; ++i) {
      std::memcpy(&lanes[i / kLanes][g * kLanes + i % kLanes], q_row + g * q_head_stride + 2 * i, 4);
    }
  }
  __m512i q_lanes[kVectors];
  for (int i = 0; i < kVectors; ++i) q_lanes[i] = _mm512_load_si512(lanes[i]);
  attend_rows<kDim, kLanes>(q_lanes, k_head, v_head, keys, n, scale, group, out, probs);
}

// attend_query for `group` query heads per kv head: each takes the lanes 16 / group leaves it, rounded down to a
// power of two, and one product takes that many dim pairs of a key.
template <int kDim>
auto attend_kernel(int group) {
  return group == 1   ? attend_query<kDim, 16>
         : group == 2 ? attend_query<kDim, 8>
         : group <= 4 ? attend_query<kDim, 4>
         : group <= 8 ? attend_query<kDim, 2>
                      : attend_query<kDim, 1>;
}

// sums[r] = x . w[r] for `rows` (at most kLinearRows) consecutive weight rows of length k, a multiple of 32: one
// AVX512-BF16 dot product per 32 values and row, the rows prefetched kLinearAhead values ahead.
constexpr int kLinearRows = 4;
constexpr int kLinearAhead = 1024;  // 2 KB: nearer (256) or none read the weights at 12-14 GB/s, this at 14-16
inline void linear_block(const uint16_t* x, const uint16_t* w, int k, int rows, float* sums) {
  __m512 acc[kLinearRows];
  for (int r = 0; r < kLinearRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int i = 0; i < k; i += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
    for (int r = 0; r < kLinearRows; ++r) {
      if (r < rows) {
        const uint16_t* p = w + int64_t(r) * k + i;
        _mm_prefetch(reinterpret_cast<const char*>(p + kLinearAhead), _MM_HINT_T0);
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(p));
      }
    }
  }
  for (int r = 0; r < rows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace

extern "C" {

// dsa_select_topk on bf16 inputs. q (T, n_heads, dim) bf16, n_heads a multiple of kHeadGroup (zero-weight
// padding); w (T, n_heads) float32; keys (n_keys, dim) bf16 rows, dim a multiple of 32. The keys are packed once
// into tiles of 16 (pack_key_tile), one register per dim pair; a thread scores kQueryBlock queries tile by tile, so
// each tile is read from memory once for all of them, and finds each query's exact top-k with AVX-512. A decode
// step's query too: packing its cache is one pass over the bf16 rows, cheaper than a float32 copy of the cache.
void dsa_select_topk_bf16(const uint16_t* q, const float* w, const uint16_t* keys, int64_t n_keys,
                          const int64_t* positions, int64_t n_queries, int n_heads, int dim, int topk, int n_sink,
                          int window, int64_t* out, int n_threads) {
  const int64_t n_tiles = (n_keys + kTileRows - 1) / kTileRows;
  const int64_t tile_size = int64_t{dim} / 2 * kTileRows;  // 32-bit dim pairs per packed tile
  std::vector<uint32_t> packed(n_tiles * tile_size);
  const uint32_t* tiles = packed.data();
  auto score = [=](int64_t t, int64_t tile, float* scores) {
    const uint32_t* packed_tile = tiles + tile * tile_size;
    _mm512_storeu_ps(scores, score_tile_bf16(q + t * n_heads * dim, w + t * n_heads, packed_tile, n_heads, dim));
  };
#pragma omp parallel num_threads(n_threads)
  {
    pack_keys(keys, n_keys, dim, packed.data());
    select_blocks<best_positions_wide>(positions, n_queries, n_tiles, kTileRows, topk, n_sink, window, out, score);
  }
}

// dsa_sparse_attention on bf16 caches, float32 out, head size 64 or 128, at most 16 query heads per kv head: per
// query and kv head, attend_rows reads exactly the selected rows. A prefill's queries on CPUs without AMX (and on AMX
// CPUs with 128-dim heads), and a decode step's on every AVX512-BF16 CPU (the union blocks of
// dsa_sparse_attention_amx would waste 15 of a tile's 16 rows on one query).
void dsa_sparse_attention_rows_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t kv_head_stride,
                                    const int64_t* indices, int64_t n_queries, int n_q_heads, int n_kv_heads,
                                    int n_sets, int dim, int topk, float scale, float* out, int n_threads) {
  const int group = n_q_heads / n_kv_heads, kv_per_set = n_kv_heads / n_sets;
  const auto attend = dim == 128 ? attend_kernel<128>(group) : attend_kernel<64>(group);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<float> probs(topk * kTileRows);  // (key, lane): the scores, then the probabilities in bf16 pairs
    std::vector<int64_t> keys(topk);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t t = 0; t < n_queries; ++t) {
      for (int h = 0; h < n_kv_heads; ++h) {
        const int64_t* chosen = indices + ((h / kv_per_set) * n_queries + t) * topk;
        int n = 0;
        for (int j = 0; j < topk; ++j) {
          if (chosen[j] >= 0) keys[n++] = chosen[j];
        }
        float* rows_out[kTileRows];
        for (int g = 0; g < group; ++g) rows_out[g] = out + ((h * group + g) * n_queries + t) * dim;
        const uint16_t* q_row = q + (h * group * n_queries + t) * dim;  // the group's first query head
        attend(q_row, n_queries * dim, k + h * kv_head_stride, v + h * kv_head_stride, keys.data(), n, scale,
               group, rows_out, probs.data());
      }
    }
  }
}

// F.linear for the few rows of a decode step: x (n_rows, k) . w (n, k)^T + bias (n,) or none -> out (n_rows, n), all
// bf16, sums in float32; k a multiple of 32. PyTorch's bf16 path reads the weights of such a product at 6-7 GB/s
// on this kind of CPU, where float32 weights stream at 15-18: a decode step is mostly these reads. The threads split
// the weight rows; a block of kLinearRows rows is read from memory once for every row of x (it stays in L1).
void dsa_linear_rows_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, int64_t n_rows, int64_t n, int k,
                          uint16_t* out, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t j0 = 0; j0 < n; j0 += kLinearRows) {
    const int rows = int(std::min<int64_t>(kLinearRows, n - j0));
    float sums[kLinearRows];
    for (int64_t t = 0; t < n_rows; ++t) {
      linear_block(x + t * k, w + j0 * k, k, rows, sums);
      for (int r = 0; r < rows; ++r) {
        out[t * n + j0 + r] = narrow<uint16_t>(sums[r] + (bias ? widen(bias[j0 + r]) : 0.0f));
      }
    }
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// bf16 kernels for CPUs with AMX as well (built where -march=native enables it; elsewhere dsa_amx_ready() answers
// 0). There dense attention runs on AMX, 3-4x faster than in float32: DSA has to use the same units to keep up. The
// prefill's union blocks round the attention's probabilities to bf16 before they weigh the values, as bf16 SDPA
// does (and attend_rows, which a decode step runs).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

namespace {

// Every tile 16 rows x 64 bytes; tile configuration is per thread.
void configure_tiles() {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = kTileRows;
  _tile_loadconfig(&config);
}

// One thread's gather attention over a block of up to 16 consecutive queries, head size 64 (see
// dsa_sparse_attention_amx). The union of the block's selections is about 2.1x k keys at k = 2048 and 3.7x at
// k = 512 on 8K of text (2.9x and 4.4x at 16K); each query's own keys are marked in a bit mask. The union is
// walked in spans of kSpan keys, each laid out as AMX tiles once and used by every query head of the kv head's
// group while it sits in L2 (one pass over the whole union per query head streamed it from L3 seven times). Per
// span and query head, tile products give the scores (query, key), a running softmax gives 0 to every key a
// query did not select and rescales the sums so far when a query's largest score grows, and tile products add
// the weighted values.
class UnionBlock {
 public:
  UnionBlock(int64_t n_keys, int topk)
      : slot_(n_keys, -1),
        most_(round_up(std::min<int64_t>(n_keys, int64_t{kTileRows} * topk), kChunk)),
        keys_(most_),
        members_(most_),
        masks_(most_),
        key_tiles_(kSpan * kHeadDim / 2),
        value_tiles_(kSpan * kHeadDim / 2),
        scores_(kTileRows * kSpan),
        probs_(kTileRows * kSpan) {}

  // The union of `rows` selections (topk indices each, -1 unused), and which query chose which key.
  void gather(const int64_t* chosen, int rows, int topk) {
    rows_ = rows;
    n_ = 0;
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < topk; ++j) {
        const int64_t key = chosen[i * topk + j];
        if (key < 0) continue;
        if (slot_[key] < 0) slot_[key] = n_, keys_[n_] = key, members_[n_++] = 0;
        members_[slot_[key]] |= 1u << i;
      }
    }
    for (int u = 0; u < n_; ++u) slot_[keys_[u]] = -1;
    padded_ = round_up(n_, kChunk);
    std::fill(&members_[n_], &members_[padded_], 0u);  // padding keys: nobody's
    for (int u0 = 0; u0 < padded_; u0 += kTileRows) {  // masks_[u0 + i]: query i's keys among u0 ... u0 + 15
      const __m512i bits = _mm512_loadu_si512(&members_[u0]);
      for (int i = 0; i < kTileRows; ++i) masks_[u0 + i] = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(1 << i));
    }
  }

  // One kv head's rows and the `group` query heads it serves: q_rows[g] (rows_, 64) bf16 -> out[g] (rows_, 64)
  // float32, both with rows 64 values apart.
  void attend(const uint16_t* k_head, const uint16_t* v_head, const uint16_t* const q_rows[], float* const out[],
              int group, float scale) {
    const uint16_t* q_tiles[kMaxGroup];
    for (int g = 0; g < group; ++g) {
      q_tiles[g] = q_rows[g];
      if (rows_ < kTileRows) {  // a tile reads 16 rows: pad the last block's queries
        uint16_t* padded = q_padded_ + g * kTileRows * kHeadDim;
        std::memset(padded, 0, kTileRows * kHeadDim * 2);
        std::memcpy(padded, q_rows[g], rows_ * kHeadDim * 2);
        q_tiles[g] = padded;
      }
      std::fill(best_[g], best_[g] + kTileRows, -INFINITY);
      std::fill(total_[g], total_[g] + kTileRows, 0.0f);
      std::fill(weighted_[g], weighted_[g] + 4 * kTile, 0.0f);
    }
    for (int s0 = 0; s0 < padded_; s0 += kSpan) {
      const int span = std::min(kSpan, padded_ - s0);
      pack(k_head, v_head, s0, span);
      for (int g = 0; g < group; ++g) {
        score(q_tiles[g], span);
        for (int i = 0; i < rows_; ++i) {
          const float factor = softmax_row(i, s0, span, scale, best_[g][i], total_[g][i]);
          if (factor != 1.0f) {  // this query's largest score grew: its sums so far shrink by the same factor
            for (int c = 0; c < 4; ++c) {
              float* sums = weighted_[g] + c * kTile + i * kTileRows;
              _mm512_storeu_ps(sums, _mm512_mul_ps(_mm512_loadu_ps(sums), _mm512_set1_ps(factor)));
            }
          }
        }
        weigh_values(weighted_[g], span);
      }
    }
    for (int g = 0; g < group; ++g) {
      for (int i = 0; i < rows_; ++i) {
        const __m512 inverse = _mm512_set1_ps(1.0f / total_[g][i]);
        for (int c = 0; c < 4; ++c) {
          const __m512 sum = _mm512_loadu_ps(weighted_[g] + c * kTile + i * kTileRows);
          _mm512_storeu_ps(out[g] + i * kHeadDim + 16 * c, _mm512_mul_ps(sum, inverse));
        }
      }
    }
  }

 private:
  static constexpr int kChunk = 2 * kTileRows;  // 32 keys: the depth of one tile product over keys
  static constexpr int kTile = kTileRows * kTileRows;  // 32-bit values in one tile
  static constexpr int kSpan = 512;  // union keys laid out at a time: 128 KB of key and value tiles
  static constexpr int kMaxGroup = 16;  // query heads per kv head
  static constexpr int kAhead = 32;  // union rows come from all over the cache: ask for them this many keys early
  static int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

  // Union keys s0 ... s0 + span - 1 of one kv head as B tiles: keys transposed to (dim pair, key) per 16 keys,
  // values interleaved to (key pair, dim) per 32 keys and 16 dims; padding keys are 0.
  void pack(const uint16_t* k_head, const uint16_t* v_head, int s0, int span) {
    auto row = [this](const uint16_t* head, int u, int half) {
      return u < n_ ? _mm512_loadu_si512(head + keys_[u] * kHeadDim + half * kTileDims) : _mm512_setzero_si512();
    };
    for (int u0 = 0; u0 < span; u0 += kTileRows) {
      const uint16_t* rows[kTileRows];
      for (int r = 0; r < kTileRows; ++r) {
        const int u = s0 + u0 + r;
        rows[r] = u < n_ ? k_head + keys_[u] * kHeadDim : nullptr;
        if (u + kAhead < n_) {
          prefetch_bf16_row(k_head + keys_[u + kAhead] * kHeadDim);
          prefetch_bf16_row(v_head + keys_[u + kAhead] * kHeadDim);
        }
      }
      pack_key_tile(rows, kHeadDim, &key_tiles_[u0 * kHeadDim / 2]);
    }
    for (int u = 0; u < span; u += 2) {
      uint32_t* tiles = &value_tiles_[u / kChunk * kChunk * kHeadDim / 2 + u % kChunk / 2 * kTileRows];
      for (int half = 0; half < 2; ++half) {  // dims 0-31, then 32-63: two tiles of 16 dims each
        const __m512i a = row(v_head, s0 + u, half), b = row(v_head, s0 + u + 1, half);
        _mm512_storeu_si512(tiles + 2 * half * kTile, _mm512_permutex2var_epi16(a, kLowPairs, b));
        _mm512_storeu_si512(tiles + (2 * half + 1) * kTile, _mm512_permutex2var_epi16(a, kHighPairs, b));
      }
    }
  }

  // scores_ (query, span key): two tiles of 16 keys in flight.
  void score(const uint16_t* q_rows, int span) {
    _tile_loadd(1, q_rows, kHeadDim * 2);
    _tile_loadd(2, q_rows + kTileDims, kHeadDim * 2);
    for (int u0 = 0; u0 < span; u0 += kChunk) {
      const uint32_t* tiles = &key_tiles_[u0 * kHeadDim / 2];
      _tile_zero(0);
      _tile_zero(5);
      _tile_loadd(3, tiles, 64);
      _tile_loadd(4, tiles + kTile, 64);
      _tile_loadd(6, tiles + 2 * kTile, 64);
      _tile_loadd(7, tiles + 3 * kTile, 64);
      _tile_dpbf16ps(0, 1, 3);
      _tile_dpbf16ps(5, 1, 6);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(5, 2, 7);
      _tile_stored(0, &scores_[u0], span * 4);
      _tile_stored(5, &scores_[u0 + kTileRows], span * 4);
    }
  }

  // Query i's probabilities over its own keys in the span, relative to its largest score so far (best, raised
  // to the span's), rounded to bf16 into its row of the A tiles in probs_ (32 keys each), their sum added to
  // total; returns the factor by which the earlier sums shrink.
  float softmax_row(int i, int s0, int span, float scale, float& best, float& total) {
    const float* row = &scores_[i * span];
    const uint16_t* masks = &masks_[s0 + i];
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (int u0 = 0; u0 < span; u0 += kTileRows) {
      most = _mm512_mask_max_ps(most, masks[u0], most, _mm512_loadu_ps(row + u0));
    }
    const float top = std::max(best, _mm512_reduce_max_ps(most));
    if (top == -INFINITY) {  // none of this query's keys yet
      for (int u0 = 0; u0 < span; u0 += kChunk)
        _mm512_storeu_si512(&probs_[u0 * kTileRows + i * kChunk], _mm512_setzero_si512());
      return 1.0f;
    }
    const float factor = best == -INFINITY ? 1.0f : std::exp((best - top) * scale);
    best = top;
    const __m512 top_v = _mm512_set1_ps(top), scale_v = _mm512_set1_ps(scale);
    auto prob = [&](int u) {
      const __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + u), top_v), scale_v);
      return _mm512_maskz_mov_ps(masks[u], exp_bf16(x));
    };
    __m512 sum = _mm512_setzero_ps();
    for (int u0 = 0; u0 < span; u0 += kChunk) {
      uint16_t* chunk = &probs_[u0 * kTileRows + i * kChunk];
      if ((masks[u0] | masks[u0 + kTileRows]) == 0) {  // none of these 32 keys is query i's
        _mm512_storeu_si512(chunk, _mm512_setzero_si512());
        continue;
      }
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(prob(u0 + kTileRows), prob(u0));  // keys in order
      _mm512_storeu_si512(chunk, both);
      sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(both)));
      sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(both, 1)));
    }
    total = total * factor + _mm512_reduce_add_ps(sum);
    return factor;
  }

  // sums (query, dim) as 4 tiles of 16 dims += the span's probabilities x values: 32 dims at a time, two chunks
  // of 32 keys in flight in their own tiles (a tile loaded again waits until the product reading it is done).
  void weigh_values(float* sums, int span) {
    for (int half = 0; half < 2; ++half) {
      _tile_loadd(0, sums + 2 * half * kTile, 64);
      _tile_loadd(1, sums + (2 * half + 1) * kTile, 64);
      for (int u0 = 0; u0 < span; u0 += 2 * kChunk) {
        const uint32_t* tiles = &value_tiles_[u0 * kHeadDim / 2 + 2 * half * kTile];
        _tile_loadd(2, &probs_[u0 * kTileRows], 64);
        _tile_loadd(3, tiles, 64);
        _tile_loadd(4, tiles + kTile, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
        if (u0 + kChunk < span) {
          _tile_loadd(5, &probs_[(u0 + kChunk) * kTileRows], 64);
          _tile_loadd(6, tiles + 4 * kTile, 64);
          _tile_loadd(7, tiles + 5 * kTile, 64);
          _tile_dpbf16ps(0, 5, 6);
          _tile_dpbf16ps(1, 5, 7);
        }
      }
      _tile_stored(0, sums + 2 * half * kTile, 64);
      _tile_stored(1, sums + (2 * half + 1) * kTile, 64);
    }
  }

  std::vector<int32_t> slot_;  // a key's place in the union, -1 outside it
  int64_t most_;  // the largest union, padded to kChunk
  int n_ = 0, padded_ = 0, rows_ = 0;  // union keys, padded to kChunk; queries in the block
  std::vector<int64_t> keys_;  // the union's keys
  std::vector<uint32_t> members_;  // bit i: query i selected this union key
  std::vector<uint16_t> masks_;  // per 16 union keys and query i: the same bits, one mask per query
  std::vector<uint32_t> key_tiles_;  // the span's keys: per 16 keys, 2 B tiles (dim pair, key) of bf16 pairs
  std::vector<uint32_t> value_tiles_;  // the span's values: per 32 keys, 4 B tiles (key pair, dim) of bf16 pairs
  std::vector<float> scores_;  // (query, span key)
  std::vector<uint16_t> probs_;  // per 32 span keys, an A tile (query, key) of bf16
  alignas(64) uint16_t q_padded_[kMaxGroup * kTileRows * kHeadDim];
  float best_[kMaxGroup][kTileRows], total_[kMaxGroup][kTileRows];  // per query head and query: running softmax
  alignas(64) float weighted_[kMaxGroup][4 * kTile];  // per query head: (query, dim) as 4 tiles of 16 dims
};

}  // namespace

extern "C" {

// Asks Linux for the AMX tile state (once per process); 1 when the bf16 kernels below may run.
int dsa_amx_ready() {
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

// dsa_select_topk on AMX. q (T rounded up to 16, n_heads, dim) bf16, w (T rounded up to 16, n_heads) float32,
// keys (n_keys, dim) bf16 rows; dim a multiple of 32. A thread takes 16 queries; per 16-key tile and index head
// one tile product gives the 16 x 16 dot products, which ReLU and the weights fold into the scores in registers.
void dsa_select_topk_amx(const uint16_t* q, const float* w, const uint16_t* keys, int64_t n_keys,
                         const int64_t* positions, int64_t n_queries, int n_heads, int dim, int topk, int n_sink,
                         int window, int64_t* out, int n_threads) {
  const int64_t n_tiles = (n_keys + kTileRows - 1) / kTileRows, row = n_tiles * kTileRows;
  const int chunks = dim / kTileDims;
  std::vector<uint32_t> packed(n_tiles * (dim / 2) * kTileRows);
#pragma omp parallel num_threads(n_threads)
  {
    pack_keys(keys, n_keys, dim, packed.data());
    configure_tiles();
    std::vector<float> scores(kTileRows * row);
    alignas(64) float dots[kTileRows * kTileRows];
    TopkScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t0 = 0; t0 < n_queries; t0 += kTileRows) {
      const int64_t t1 = std::min<int64_t>(n_queries, t0 + kTileRows);
      const int64_t last = *std::max_element(positions + t0, positions + t1);
      const bool selects = last + 1 > topk;  // else every query takes all its keys: no scores needed
      for (int64_t tile = 0; selects && tile * kTileRows <= last; ++tile) {
        v16 total[kTileRows] = {};
        for (int h = 0; h < n_heads; ++h) {
          _tile_zero(0);
          for (int c = 0; c < chunks; ++c) {
            _tile_loadd(1, q + (t0 * n_heads + h) * dim + c * kTileDims, n_heads * dim * 2);
            _tile_loadd(2, packed.data() + (tile * chunks + c) * kTileRows * kTileRows, 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, dots, 64);
          for (int i = 0; i < kTileRows; ++i) {
            const v16 dot = load16(dots + i * kTileRows);
            total[i] += w[(t0 + i) * n_heads + h] * (dot > 0.0f ? dot : v16{});
          }
        }
        for (int64_t t = t0; t < t1; ++t) store16(scores.data() + (t - t0) * row + tile * kTileRows, total[t - t0]);
      }
      for (int64_t t = t0; t < t1; ++t) {
        select_row<best_positions_wide>(scores.data() + (t - t0) * row, positions[t], topk, n_sink, window, scratch,
                                        out + t * topk);
      }
    }
    _tile_release();
  }
}

// dsa_sparse_attention on AMX, bf16 in, float32 out. q (n_q_heads, T, 64); k, v (n_kv_heads, >= n_keys, 64)
// with kv_head_stride values between heads. A thread takes a block of 16 consecutive queries (UnionBlock): the
// union of their selections is gathered once for the block, every kv head of the selection set and every query
// head of its group. Keys outside the union are never read, and no query's output sees a key it did not select.
void dsa_sparse_attention_amx(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t kv_head_stride,
                              int64_t n_keys, const int64_t* indices, int64_t n_queries, int n_q_heads, int n_kv_heads,
                              int n_sets, int topk, float scale, float* out, int n_threads) {
  const int group = n_q_heads / n_kv_heads, kv_per_set = n_kv_heads / n_sets;
  const int64_t n_blocks = (n_queries + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(n_threads)
  {
    configure_tiles();
    UnionBlock block(n_keys, topk);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int set = 0; set < n_sets; ++set) {
        const int64_t t0 = b * kTileRows;
        const int nq = static_cast<int>(std::min<int64_t>(kTileRows, n_queries - t0));
        block.gather(indices + (set * n_queries + t0) * topk, nq, topk);
        for (int h = set * kv_per_set; h < (set + 1) * kv_per_set; ++h) {
          const uint16_t* q_rows[kTileRows];
          float* out_rows[kTileRows];
          for (int g = 0; g < group; ++g) {
            q_rows[g] = q + ((h * group + g) * n_queries + t0) * kHeadDim;
            out_rows[g] = out + ((h * group + g) * n_queries + t0) * kHeadDim;
          }
          block.attend(k + h * kv_head_stride, v + h * kv_head_stride, q_rows, out_rows, group, scale);
        }
      }
    }
    _tile_release();
  }
}

// dsa_select_topk_amx for a few queries (decode), with keys (n_keys, dim) bf16 rows read in place: the key rows
// are the A tiles, and the B tiles hold the queries' index heads, one (query, head) per column. Threads split the
// keys; each 16 x 16 tile of dot products is transposed in registers so that ReLU and the weights fold a head's
// column into 16 keys' scores at once. n_heads at most 16.
void dsa_select_topk_amx_rows(const uint16_t* q, const float* w, const uint16_t* keys, int64_t n_keys,
                              const int64_t* positions, int64_t n_queries, int n_heads, int dim, int topk, int n_sink,
                              int window, int64_t* out, int n_threads) {
  const int64_t n_tiles = (n_keys + kTileRows - 1) / kTileRows, row = n_tiles * kTileRows;
  const int chunks = dim / kTileDims, per_pass = kTileRows / n_heads;
  std::vector<float> scores(n_queries * row);
  for (int64_t t0 = 0; t0 < n_queries; t0 += per_pass) {
    const int64_t t1 = std::min<int64_t>(n_queries, t0 + per_pass);
    const int64_t last = *std::max_element(positions + t0, positions + t1);
    if (last + 1 <= topk) continue;  // every query takes all its keys: no scores needed
    std::vector<uint32_t> columns(chunks * kTileRows * kTileRows, 0);  // B tiles: (dim pair, (query, head))
    for (int64_t t = t0; t < t1; ++t) {
      for (int h = 0; h < n_heads; ++h) {
        const uint16_t* qh = q + (t * n_heads + h) * dim;
        for (int i = 0; i < dim / 2; ++i) {
          std::memcpy(&columns[i * kTileRows + (t - t0) * n_heads + h], qh + 2 * i, sizeof(uint32_t));
        }
      }
    }
#pragma omp parallel num_threads(n_threads)
    {
      configure_tiles();
      std::vector<uint16_t> padded(kTileRows * dim);  // the last, partial tile of keys, zero past n_keys
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile <= last / kTileRows; ++tile) {
        const uint16_t* rows = keys + tile * kTileRows * dim;
        if ((tile + 1) * kTileRows > n_keys) {
          const int64_t have = n_keys - tile * kTileRows;
          std::fill(std::copy(rows, rows + have * dim, padded.begin()), padded.end(), uint16_t{0});
          rows = padded.data();
        }
        _tile_zero(0);
        for (int c = 0; c < chunks; ++c) {
          _tile_loadd(1, rows + c * kTileDims, dim * 2);
          _tile_loadd(2, &columns[c * kTileRows * kTileRows], 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        alignas(64) float dots[kTileRows * kTileRows];  // (key, column)
        _tile_stored(0, dots, 64);
        __m512i by_column[kTileRows];
        for (int r = 0; r < kTileRows; ++r) by_column[r] = _mm512_load_si512(dots + r * kTileRows);
        transpose16(by_column);
        for (int64_t t = t0; t < t1; ++t) {
          __m512 total = _mm512_setzero_ps();
          for (int h = 0; h < n_heads; ++h) {
            const __m512 dot = _mm512_castsi512_ps(by_column[(t - t0) * n_heads + h]);
            total = _mm512_fmadd_ps(_mm512_set1_ps(w[t * n_heads + h]), _mm512_max_ps(dot, _mm512_setzero_ps()), total);
          }
          _mm512_storeu_ps(scores.data() + t * row + tile * kTileRows, total);
        }
      }
      _tile_release();
    }
  }
#pragma omp parallel num_threads(std::min<int64_t>(n_threads, n_queries))
  {
    TopkScratch scratch;
#pragma omp for
    for (int64_t t = 0; t < n_queries; ++t) {
      select_row<best_positions_wide>(scores.data() + t * row, positions[t], topk, n_sink, window, scratch,
                                      out + t * topk);
    }
  }
}

}  // extern "C"
#else
extern "C" int dsa_amx_ready() { return 0; }
#endif  // AMX
#else
extern "C" int dsa_amx_ready() { return 0; }
#endif  // AVX512-BF16
