// Decode attention over the paged KV pool, fp32, CPU: one query token per row.
//
// Built and loaded by disagg/engine/kernels/cpu.py (g++ -O3 -march=native
// -fopenmp; the OpenMP runtime resolves to the one torch already loaded, so
// the kernel runs on torch's threads). Layouts (all C-contiguous):
//   q, out   [b, heads, d]             query head i reads KV head i / (heads / kv_heads)
//   k, v     [blocks, bs, kv_heads, d] one layer of the pool (kv_cache.py)
//   table    [b, width] int64          row r's token t is in block table[r][t / bs]
//   lens     [b] int64                 row r attends to its tokens [lo, lens[r]),
//                                      lo = lens[r] - window when window > 0, else 0
// One task per row and range of its KV heads (every head when there are enough
// rows, else one): the scores of its query heads over every key in one pass
// over K, an exact max-subtracted softmax, the weighted sum of V in one pass
// over V. Block by block, prefetching the next block as it goes; nothing is
// gathered or copied out of the pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Prefetches `span` floats of token t of a block (one 64-byte line per 16 floats).
inline void prefetch_token(const float* p, int64_t t, int64_t row, int64_t span) {
  for (int64_t x = 0; x < span; x += 16) __builtin_prefetch(p + t * row + x);
}

// Calls f(i, p) for each token t = lo + i of [lo, len), p pointing at its
// first head of interest in `base` (one layer's K or V: element (t, h0) of the
// row's blocks), block by block. The next block is prefetched token by token
// as this one is read: a whole block's lines requested at once overflow the
// core's miss buffers and most of them are dropped (measured: no faster than
// no prefetch at all; spread out, 20-30 % faster on K/V that is not in cache).
template <class F>
inline void each_token(const float* base, const int64_t* blocks, int64_t lo, int64_t len,
                       int64_t bs, int64_t row, int64_t offset, int64_t span, F&& f) {
  const int64_t blk = bs * row;
  const int64_t b0 = lo / bs, b1 = (len - 1) / bs;
  for (int64_t bi = b0; bi <= b1; ++bi) {
    const float* pb = base + blocks[bi] * blk + offset;
    const float* pn = bi < b1 ? base + blocks[bi + 1] * blk + offset : nullptr;
    const int64_t t0 = std::max(lo, bi * bs) - bi * bs, t1 = std::min(len, (bi + 1) * bs) - bi * bs;
    for (int64_t t = 0; t < t0 && pn; ++t) prefetch_token(pn, t, row, span);
    for (int64_t t = t0; t < t1; ++t) {
      if (pn) prefetch_token(pn, t, row, span);
      f(bi * bs + t - lo, pb + t * row);
    }
    for (int64_t t = t1; t < bs && pn; ++t) prefetch_token(pn, t, row, span);
  }
}

// One task: row r, KV heads [h0, h0 + nh). D is head_dim when known at compile
// time (the loops then unroll into straight vector code), 0 for any other.
template <int D>
void attend(const float* q, const float* k, const float* v, const int64_t* blocks, int64_t len,
            float* out, int64_t g, int64_t h0, int64_t nh, int64_t dd, int64_t bs,
            int64_t row, float scale, int64_t window) {
  const int64_t d = D > 0 ? D : dd;
  const int64_t gh = nh * g;  // query heads of this task
  const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  const int64_t n = len - lo;
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < gh * (n + d + 1)) scratch.resize(gh * (n + d + 1));
  float* s = scratch.data();  // [gh, n] scores, then probabilities
  float* acc = s + gh * n;    // [gh, d] weighted sums of V
  float* inv = acc + gh * d;  // [gh] 1 / softmax denominators
  const int64_t offset = h0 * d, span = nh * d;

  each_token(k, blocks, lo, len, bs, row, offset, span, [&](int64_t i, const float* kt) {
    for (int64_t j = 0; j < gh; ++j) {
      const float* qj = q + j * d;
      const float* kj = kt + (j / g) * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t x = 0; x < d; ++x) dot += qj[x] * kj[x];
      s[j * n + i] = dot * scale;
    }
  });
  for (int64_t j = 0; j < gh; ++j) {
    float* sj = s + j * n;
    float m = sj[0];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, sj[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sj[i] = std::exp(sj[i] - m);
      sum += sj[i];
    }
    inv[j] = 1.f / sum;
  }
  std::fill(acc, acc + gh * d, 0.f);
  each_token(v, blocks, lo, len, bs, row, offset, span, [&](int64_t i, const float* vt) {
    for (int64_t j = 0; j < gh; ++j) {
      const float p = s[j * n + i];
      const float* vj = vt + (j / g) * d;
      float* aj = acc + j * d;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) aj[x] += p * vj[x];
    }
  });
  for (int64_t j = 0; j < gh; ++j) {
    float* oj = out + j * d;
    for (int64_t x = 0; x < d; ++x) oj[x] = acc[j * d + x] * inv[j];
  }
}

}  // namespace

extern "C" int disagg_paged_decode_f32(
    const float* q, const float* k, const float* v, const int64_t* table, const int64_t* lens,
    float* out, int64_t b, int64_t heads, int64_t kv_heads, int64_t d, int64_t bs,
    int64_t width, float scale, int64_t window, int threads) {
  if (b <= 0) return 0;
  if (kv_heads <= 0 || heads % kv_heads != 0 || d <= 0 || bs <= 0 || width <= 0) return 1;
  const int64_t g = heads / kv_heads;
  const int64_t row = kv_heads * d;  // floats per token of one layer (every KV head)
  // A task is one row and a range of its KV heads: every head when there are
  // enough rows to keep the threads busy (each block is then read front to
  // back, which the hardware prefetcher streams), else one head per task.
  const int64_t split = b >= 4 * (int64_t)threads ? 1 : kv_heads;
  const int64_t per = kv_heads / split;
  int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2) reduction(| : bad)
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t part = 0; part < split; ++part) {
      const int64_t len = lens[r];
      if (len <= 0 || len > width * bs) {
        bad = 1;
        continue;
      }
      const int64_t h0 = part * per, off = (r * heads + h0 * g) * d;
      const int64_t* blocks = table + r * width;
      switch (d) {
        case 64:
          attend<64>(q + off, k, v, blocks, len, out + off, g, h0, per, d, bs, row, scale, window);
          break;
        case 128:
          attend<128>(q + off, k, v, blocks, len, out + off, g, h0, per, d, bs, row, scale, window);
          break;
        default:
          attend<0>(q + off, k, v, blocks, len, out + off, g, h0, per, d, bs, row, scale, window);
      }
    }
  }
  return bad ? 2 : 0;
}
