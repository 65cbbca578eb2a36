// DeepSeek Sparse Attention on the CPU: fused index scores + exact top-k, and gather attention.
// Compiled once per machine by kernels/cpu_dsa.py (g++ -O3 -march=native -fopenmp) and called through ctypes
// on float32 buffers. PyTorch references: indexer_model.indexer.select_topk and
// indexer_model.dsa.masked_dense_attention_reference; the test is tests/test_kernels_cpu_dsa.py.
//
// Why C++: in PyTorch operations the index scores pass over a (queries x keys) tile once per index head and
// the union of a block's selections covers most of the prefix, so DSA did about dense's work at 8K. Here each
// query scores its keys in one fused pass and attends to exactly its own k keys.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// 12 independent sums (4 heads x 3 key registers) keep both FMA pipes busy; with 16-key tiles (8 sums) this loop
// ran at about half of a float32 matmul's rate, now at three quarters (docs/benchmarks.md, "DSA on the CPU").
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
// the lowest positions. Two passes over the row: a histogram of the keys' top kRadixBits bits finds the bucket that holds the
// wanted-th largest; the second keeps the positions at or above that bucket (about wanted of them) and the bucket's
// values, and nth_element runs over the bucket alone. Counting the values above the threshold and writing the
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
      filled += best_positions(scores, first, last, wanted, scratch, out + filled);
    }
    for (int64_t s = last; s <= position; ++s) out[filled++] = s;
  }
  std::fill(out + filled, out + topk, int64_t{-1});
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
  const int64_t row = n_tiles * kKeyTile;
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<float> scores(kQueryBlock * row);
    TopkScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t0 = 0; t0 < n_queries; t0 += kQueryBlock) {
      const int64_t t1 = std::min<int64_t>(n_queries, t0 + kQueryBlock);
      const int64_t last = *std::max_element(positions + t0, positions + t1);
      for (int64_t tile = 0; tile * kKeyTile <= last; ++tile) {
        const float* keys = tiles + tile * dim * kKeyTile;
        for (int64_t t = t0; t < t1; ++t) {
          if (positions[t] + 1 > topk && tile * kKeyTile <= positions[t]) {
            score_tile(q + t * n_heads * dim, w + t * n_heads, keys, n_heads, dim,
                       scores.data() + (t - t0) * row + tile * kKeyTile);
          }
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        select_row(scores.data() + (t - t0) * row, positions[t], topk, n_sink, window, scratch, out + t * topk);
      }
    }
  }
}

// Top-k selection for a few queries (decode): keys (n_keys, dim) as the index key cache holds them.
void dsa_select_topk_rows(const float* q, const float* w, const float* keys, int64_t n_keys,
                          const int64_t* positions, int64_t n_queries, int n_heads, int dim, int topk, int n_sink,
                          int window, int64_t* out) {
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
                          const int64_t* indices, int64_t n_queries, int n_q_heads, int n_kv_heads, int n_sets,
                          int dim, int topk, float scale, float* out, int n_threads) {
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

}  // extern "C"
