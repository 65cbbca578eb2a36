// Exact top-k of each row's bf16 index scores, one thread block a row (see cuda_topk.py).
//
// One read of the row splits off the keys above a threshold taken from a sample of it (kept in shared
// memory with their order keys) and the first keys tied at it. With fewer than k above, the top-k is
// those plus the first tied keys; otherwise a radix select over the keys above (the high byte, then the
// low byte of the order key) finds the k-th. Either way the row's top-k is written in column order.
// Every compaction is a warp shuffle scan and one barrier, where Triton's block scan and layout shuffles
// cost ~50 instructions a key. Rows the sample misjudged take a radix select over the whole row (status 2).
//
// THREADS (at least 256: one histogram bin a thread), MIN_BLOCKS and PREFETCH (how many steps' loads run ahead)
// come from the compile options; the dynamic shared memory holds the lists: cuda_topk.shared_bytes.

#ifndef THREADS
#define THREADS 512
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 3
#endif
#ifndef PREFETCH
#define PREFETCH 1
#endif
#define WARPS (THREADS / 32)
#define PER_THREAD 8  // one 16-byte load of bf16 scores
#define STEP (THREADS * PER_THREAD)
#define SAMPLE 1024

// bf16 bits -> 16-bit key whose unsigned order is the float order (-inf lowest, +inf highest).
__device__ __forceinline__ unsigned order_key(unsigned bits) {
    return (bits & 0x8000u) ? (bits ^ 0xFFFFu) : (bits | 0x8000u);
}

// The 8 scores from `first` on as one 16-byte load, or zeros where the row ends inside them.
__device__ __forceinline__ uint4 whole_vector(const unsigned short* row, int first, int row_len) {
    return first + PER_THREAD <= row_len ? *reinterpret_cast<const uint4*>(row + first) : make_uint4(0, 0, 0, 0);
}

// Exclusive block-wide prefix sum of `value` and the block's total. Callers alternate between two `sums`
// buffers, so the one barrier here also orders the previous call's reads before this call's writes.
__device__ __forceinline__ unsigned block_prefix(unsigned value, unsigned* sums, unsigned* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned inclusive = value;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        unsigned up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
    }
    if (lane == 31) sums[warp] = inclusive;
    __syncthreads();
    unsigned before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        unsigned s = sums[w];
        before += w < warp ? s : 0u;
        all += s;
    }
    *total = all;
    return before + inclusive - value;
}

// How many of the n ascending values in `list` are below `value` (a binary search).
__device__ __forceinline__ int count_below(const int* list, int n, int value) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (list[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Run by one warp: the first bin (0 = largest) at which the running count of `hist` reaches `want`, and how
// many of `want` fall inside it.
__device__ __forceinline__ void boundary_bin(const unsigned* hist, int want, int* bin, int* inside) {
    const int lane = threadIdx.x & 31;
    unsigned local[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        local[j] = hist[lane * 8 + j];
        sum += local[j];
    }
    unsigned inclusive = sum;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        unsigned up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
    }
    unsigned running = inclusive - sum;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (running < (unsigned)want && running + local[j] >= (unsigned)want) {
            *bin = lane * 8 + j;
            *inside = want - (int)running;
        }
        running += local[j];
    }
}

// The k-th largest of n order keys (key_at(i)) by a radix select, bins ranked largest first: the high byte,
// then the low byte; and how many keys equal to it the top-k takes.
template <typename KeyAt>
__device__ __forceinline__ void radix_kth(KeyAt key_at, int n, int topk, unsigned* hist, int* pick, unsigned* kth,
                                          int* ties_to_take) {
    const int t = threadIdx.x;
    if (t < 256) hist[t] = 0;
    __syncthreads();
    for (int i = t; i < n; i += THREADS) atomicAdd(&hist[255 - (key_at(i) >> 8)], 1u);
    __syncthreads();
    if (t < 32) boundary_bin(hist, topk, &pick[0], &pick[1]);
    __syncthreads();
    const int high_bin = pick[0], need = pick[1];
    if (t < 256) hist[t] = 0;
    __syncthreads();
    for (int i = t; i < n; i += THREADS) {
        const unsigned k = key_at(i);
        if (255 - (int)(k >> 8) == high_bin) atomicAdd(&hist[255 - (k & 0xFFu)], 1u);
    }
    __syncthreads();
    if (t < 32) boundary_bin(hist, need, &pick[2], &pick[3]);
    __syncthreads();
    *kth = ((unsigned)(255 - high_bin) << 8) | (unsigned)(255 - pick[2]);
    *ties_to_take = pick[3];
}

// The exact top-k of a row whose sampled threshold missed, over every key, then an emit pass in column order:
// three reads of the row by one block, where the Triton whole-row launch lasted as long as its slowest row.
__device__ void select_whole_row(const unsigned short* row_scores, int row_len, int topk, int* row_out,
                                 unsigned* hist, int* pick, unsigned (*sums)[WARPS], int parity) {
    const int t = threadIdx.x;
    unsigned kth;
    int ties_to_take;
    radix_kth([&](int i) { return order_key(row_scores[i]); }, row_len, topk, hist, pick, &kth, &ties_to_take);

    // A key's slot: the keys above the k-th before it, plus the ties before it (at most ties_to_take).
    int n_greater = 0, n_equal = 0;
    for (int base = 0; base < row_len; base += THREADS) {
        const int i = base + t;
        const unsigned k = i < row_len ? order_key(row_scores[i]) : 0u;
        const bool greater = i < row_len && k > kth, equal = i < row_len && k == kth;
        unsigned total;
        const unsigned prefix = block_prefix((unsigned)greater | ((unsigned)equal << 16), sums[parity], &total);
        parity ^= 1;
        const int g = n_greater + (int)(prefix & 0xFFFFu), e = n_equal + (int)(prefix >> 16);
        if (greater || (equal && e < ties_to_take)) row_out[g + min(e, ties_to_take)] = i;
        n_greater += (int)(total & 0xFFFFu);
        n_equal += (int)(total >> 16);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) topk_rows(
    const unsigned short* __restrict__ scores, int* __restrict__ out, int* __restrict__ status,
    int stride_sb, int stride_st, int stride_ob, int stride_ot, int q_start, int n_keys, int topk,
    int capacity, const long long* __restrict__ device_start, int start_on_device) {
    extern __shared__ int lists[];
    int* cand_col = lists;                    // capacity: the keys above the threshold
    int* tie_col = cand_col + capacity;       // topk: the first keys equal to it
    unsigned short* cand_key = (unsigned short*)(tie_col + topk);  // capacity: their order keys
    __shared__ unsigned sums[2][WARPS];
    __shared__ unsigned hist[256];
    __shared__ int pick[4];

    const int row = blockIdx.x, batch = blockIdx.y, t = threadIdx.x;
    const unsigned short* row_scores = scores + (long long)batch * stride_sb + (long long)row * stride_st;
    int* row_out = out + (long long)batch * stride_ob + (long long)row * stride_ot;
    int* row_status = status + (long long)batch * gridDim.x + row;
    if (start_on_device) q_start = (int)*device_start;  // a decode step replayed from a CUDA graph
    const int row_len = min(q_start + row + 1, n_keys);
    if (row_len <= topk) {  // every key is selected; the rest are unused slots
        for (int i = t; i < topk; i += THREADS) row_out[i] = i < row_len ? i : -1;
        if (t == 0) *row_status = 0;
        return;
    }

    // The sample's rank-th largest key keeps ~1.25 x topk keys at or above it, plus 4 standard deviations.
    unsigned sampled[SAMPLE / THREADS];
#pragma unroll
    for (int j = 0; j < SAMPLE / THREADS; ++j)
        sampled[j] = order_key(row_scores[(long long)(t + j * THREADS) * row_len / SAMPLE]);
    const float expected = (float)SAMPLE * topk / row_len;
    const int rank = min((int)(expected * 1.25f + 4.0f * sqrtf(expected) + 8.0f), SAMPLE - 1);
    unsigned threshold = 0;
    for (int bit = 15; bit >= 0; --bit) {
        const unsigned candidate = threshold | (1u << bit);
        int n = 0;
#pragma unroll
        for (int j = 0; j < SAMPLE / THREADS; ++j) n += __syncthreads_count(sampled[j] >= candidate);
        if (n > rank) threshold = candidate;
    }

    int n_above = 0, n_ties = 0, parity = 0;
#if PREFETCH  // the next PREFETCH steps' loads are in flight during this step's scan and barrier
    uint4 ahead[PREFETCH];
#pragma unroll
    for (int j = 0; j < PREFETCH; ++j) ahead[j] = whole_vector(row_scores, t * PER_THREAD + j * STEP, row_len);
#endif
    for (int base = 0; base < row_len; base += STEP) {
        const int first = base + t * PER_THREAD;
#if PREFETCH
        const uint4 v = ahead[0];
#pragma unroll
        for (int j = 0; j + 1 < PREFETCH; ++j) ahead[j] = ahead[j + 1];
        ahead[PREFETCH - 1] = whole_vector(row_scores, first + PREFETCH * STEP, row_len);
#else
        const uint4 v = whole_vector(row_scores, first, row_len);
#endif
        unsigned key[PER_THREAD], valid = 0;
        if (first + PER_THREAD <= row_len) {
            const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                key[2 * j] = order_key(words[j] & 0xFFFFu);
                key[2 * j + 1] = order_key(words[j] >> 16);
            }
            valid = 0xFFu;
        } else {
#pragma unroll
            for (int j = 0; j < PER_THREAD; ++j) {
                const bool inside = first + j < row_len;
                key[j] = inside ? order_key(row_scores[first + j]) : 0u;
                valid |= (unsigned)inside << j;
            }
        }
        unsigned above = 0, tie = 0;
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            above |= (unsigned)(key[j] > threshold) << j;
            tie |= (unsigned)(key[j] == threshold) << j;
        }
        above &= valid;
        tie &= valid;
        unsigned total;
        const unsigned prefix = block_prefix(__popc(above) | (__popc(tie) << 16), sums[parity], &total);
        parity ^= 1;
        int a = n_above + (int)(prefix & 0xFFFFu), b = n_ties + (int)(prefix >> 16);
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            if ((above >> j) & 1u) {
                if (a < capacity) {
                    cand_col[a] = first + j;
                    cand_key[a] = (unsigned short)key[j];
                }
                ++a;
            }
            if ((tie >> j) & 1u) {
                if (b < topk) tie_col[b] = first + j;
                ++b;
            }
        }
        n_above += (int)(total & 0xFFFFu);
        n_ties += (int)(total >> 16);
    }
    __syncthreads();  // the lists are complete

    if (n_above < topk) {
        if (n_above + n_ties < topk) {  // the sample's threshold was too high: the whole row decides
            select_whole_row(row_scores, row_len, topk, row_out, hist, pick, sums, parity);
            if (t == 0) *row_status = 2;
            return;
        }
        // Both lists are in column order: merged by rank, the row's top-k comes out sorted.
        const int n_tied = topk - n_above;
        for (int i = t; i < n_above; i += THREADS) row_out[i + count_below(tie_col, n_tied, cand_col[i])] = cand_col[i];
        for (int i = t; i < n_tied; i += THREADS) row_out[i + count_below(cand_col, n_above, tie_col[i])] = tie_col[i];
        if (t == 0) *row_status = 0;
        return;
    }
    if (n_above > capacity) {  // the threshold was too low: the list overflowed
        select_whole_row(row_scores, row_len, topk, row_out, hist, pick, sums, parity);
        if (t == 0) *row_status = 2;
        return;
    }

    // Radix select over the keys above.
    unsigned kth;
    int ties_to_take;
    radix_kth([&](int i) { return (unsigned)cand_key[i]; }, n_above, topk, hist, pick, &kth, &ties_to_take);

    // Emit in list order, which is column order, so the row's top-k comes out sorted: every key above the
    // k-th key and the first ties_to_take keys equal to it (the lowest positions win, as the reference).
    const int per = (capacity + THREADS - 1) / THREADS;
    const int lo = t * per, hi = min(lo + per, n_above);
    unsigned greater = 0, equal = 0;
    for (int i = lo; i < hi; ++i) {
        greater += cand_key[i] > kth;
        equal += cand_key[i] == kth;
    }
    unsigned total;
    const unsigned prefix = block_prefix(greater | (equal << 16), sums[parity], &total);
    int e = (int)(prefix >> 16);
    int slot = (int)(prefix & 0xFFFFu) + min(e, ties_to_take);
    for (int i = lo; i < hi; ++i) {
        const unsigned k = cand_key[i];
        if (k > kth || (k == kth && e < ties_to_take)) row_out[slot++] = cand_col[i];
        e += k == kth;
    }
    if (t == 0) *row_status = 0;
}
