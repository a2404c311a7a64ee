// DropKey attention on CPU: a fused forward and backward for float32 (the `cpp` backend).
//
// Built at first use by dropkey/kernels/cpu_kernel.py (g++/clang -O3 -march=native -fopenmp,
// linked against torch's libtorch_cpu for its BLAS `sgemm_`) and called through ctypes.
//
// Layout. q, k, v, out and the gradients are (B, H, N, d) tensors with unit stride on d and
// arbitrary element strides on B, H and N (`Strides`), so the permuted q, k, v of a ViT's
// fused qkv projection are read in place. lse is a contiguous (B, H, Nq) float32 tensor.
//
// Per (batch, head) slice s = b * H + h and block of `rows` queries (one L2-sized tile of
// rows x Nk logits, never the whole N x N):
//   forward   S = scale * Q K^T (sgemm); per row: drop flags from the counter-based hash (see
//             dropkey/kernels/hash_mask.py, bit for bit) and the row max over kept logits in
//             one pass, E = keep * exp(S - max), lse = max + log(sum E); O = (E V) / sum E.
//   backward  recompute S (sgemm) and, in one pass per row, the flags, P = keep * exp(S - lse)
//             and dS = P * (dP - rowsum(dO * O)) with dP = dO V^T (sgemm); then dV += P^T dO,
//             dQ = scale dS K, dK += scale dS^T Q (sgemm).
// Nothing N x N is stored between forward and backward: the mask is a pure function of
// (seed, s, query, key) and is recomputed.
//
// A row whose keys are all dropped follows the convention `conv`: 0 "zero" (weights 0),
// 1 "uniform" (weights 1/Nk: out = mean of v), 2 "undropped" (plain softmax of the row).
// Under 0 and 1 the row's output does not depend on its logits, so its dS is 0.
//
// NaN in, NaN out: a NaN logit, kept or dropped, makes its row's output and lse NaN (a NaN
// key is NaN in every row, whatever the mask), as on the reference backend; counted in the
// forward's first pass over the row (one compare per logit), see softmax_row.
//
// Threads: one OpenMP team of `threads` (torch's libgomp, via rpath). The forward splits
// work over (slice, query block) pairs, the backward over slices (a slice's dK and dV sum
// over its query blocks), so results do not depend on the thread count. BLAS calls run
// single-threaded inside the team.
//
// Compiled without -ffast-math: exp is the polynomial below (vectorisable, NaN in -> NaN
// out), reductions vectorise through `omp simd reduction`.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count, C interface (present in torch's x86 builds; the lowercase
// name is the Fortran one, which takes a pointer); weak: null where absent.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

// Column-major BLAS on row-major data: C(m x n, col-major, ldc) = alpha op(A) op(B) + beta C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// ---- the hash mask (dropkey/kernels/hash_mask.py) ----------------------------------------
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t slice_key(uint64_t seed, uint32_t s) {
  const uint32_t low = (uint32_t)seed, high = (uint32_t)(seed >> 32);
  return fmix32(fmix32(s * 0x9E3779B1u + high) ^ low);
}

inline uint32_t row_key(uint32_t slice, uint32_t i) { return fmix32(slice ^ (i * 0x85EBCA77u)); }

// 1 if logit (row, j) is kept: its 24-bit hash is at least the threshold T = round(r 2^24).
inline int kept_flag(uint32_t row, int j, uint32_t threshold) {
  return (fmix32(row + (uint32_t)j * 0xC2B2AE3Du) >> 8) >= threshold;
}

// ---- exp for x <= 0 ----------------------------------------------------------------------
// Cody-Waite reduction x = n ln2 + t, |t| <= ln2 / 2, then a degree-6 polynomial for e^t
// (Cephes' expf coefficients; relative error about 1e-7) scaled by 2^n built in the exponent
// bits. Below -87.3 (where 2^n would leave the normal range) the result is 0.
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t shift;
  std::memcpy(&shift, &t, sizeof shift);
  const int32_t exponent = (shift - 0x4B400000 + 127) << 23;  // (n + 127) << 23
  float scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return x < -87.3f ? 0.0f : y * scale;
}

int block_rows(int nq, int nk) {
  // about 64 KiB of logits per tile (two tiles live in backward), at least 8 rows
  const int rows = 16384 / std::max(nk, 1);
  return std::max(1, std::min(nq, std::max(rows, 8)));
}

struct Strides {
  int64_t b, h, n;
};

struct Shape {
  int64_t batch, heads;
  int nq, nk, d, dv;
};

inline const float* at(const float* base, const Strides& st, int64_t s, int64_t heads) {
  return base + (s / heads) * st.b + (s % heads) * st.h;
}
inline float* at(float* base, const Strides& st, int64_t s, int64_t heads) {
  return base + (s / heads) * st.b + (s % heads) * st.h;
}

// Sequential BLAS inside the team; restores the previous per-thread setting on exit.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Forward, one row of the tile: drop flags (into keep) and, in the same pass, the row
// maximum over the kept logits and a count of NaN logits, kept or dropped; then
// p = keep * exp(p - max), left unnormalised (the output row is divided by the sum after the
// P V product, which touches dv values instead of Nk). Returns the row's log-sum-exp and sets
// *inverse to the factor for its output row. An all-dropped row gets weights 0 ("zero") or
// 1/Nk ("uniform"), factor 1 and lse 0, or the plain softmax of the row ("undropped").
// NaN in, NaN out (the reference's rule): a NaN logit makes its row NaN even where the mask
// drops it (a NaN key is NaN in every row), except in a "zero"/"uniform" all-dropped row,
// whose output does not depend on its logits. The max is then NaN, and so are the kept
// weights, the sum, the factor and the lse (the backward's weights follow).
inline float softmax_row(float* p, float* keep, uint32_t row, int nk, uint32_t threshold, int conv,
                         float* inverse) {
  int kept = 0, nans = 0;
  float m = -INFINITY;
#pragma omp simd reduction(+ : kept, nans) reduction(max : m)
  for (int j = 0; j < nk; ++j) {
    const int k = kept_flag(row, j, threshold);
    keep[j] = (float)k;
    kept += k;
    nans += p[j] != p[j];
    const float x = k ? p[j] : -INFINITY;
    m = x > m ? x : m;
  }
  *inverse = 1.0f;
  if (kept == 0) {
    if (conv != 2) {
      std::fill(p, p + nk, conv == 0 ? 0.0f : 1.0f / (float)nk);
      return 0.0f;
    }
    std::fill(keep, keep + nk, 1.0f);
#pragma omp simd reduction(max : m)
    for (int j = 0; j < nk; ++j) m = p[j] > m ? p[j] : m;
  }
  if (nans > 0) m = NAN;  // the max skips NaN (x > m is false): set it, so that the row is NaN
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < nk; ++j) {
    const float e = exp_nonpositive(keep[j] != 0.0f ? p[j] - m : 0.0f) * keep[j];
    p[j] = e;
    sum += e;
  }
  *inverse = 1.0f / sum;
  return m + std::log(sum);
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 on a bad argument.
int dropkey_cpu_forward(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv,
                        float* out, Strides so, float* lse, Shape shape, float scale, uint64_t seed,
                        uint32_t threshold, int conv, int threads) {
  if (shape.nq < 1 || shape.nk < 1 || shape.d < 1 || shape.dv < 1 || conv < 0 || conv > 2 || threads < 1) return 1;
  const int nq = shape.nq, nk = shape.nk, d = shape.d, dv = shape.dv;
  const int64_t heads = shape.heads, slices = shape.batch * shape.heads;
  const int rows_per_block = block_rows(nq, nk);
  const int64_t blocks = (nq + rows_per_block - 1) / rows_per_block;
#pragma omp parallel num_threads(threads)
  {
    SequentialBlas sequential;
    std::vector<float> tile((size_t)rows_per_block * nk), keep(nk), inverse(rows_per_block);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < slices * blocks; ++task) {
      const int64_t s = task / blocks;
      const int i0 = (int)(task % blocks) * rows_per_block;
      const int rows = std::min(rows_per_block, nq - i0);
      const float* qs = at(q, sq, s, heads) + i0 * sq.n;
      const float* ks = at(k, sk, s, heads);
      const float* vs = at(v, sv, s, heads);
      float* os = at(out, so, s, heads) + i0 * so.n;
      float* ls = lse + s * nq + i0;
      const uint32_t slice = slice_key(seed, (uint32_t)s);
      gemm('T', 'N', nk, rows, d, scale, ks, sk.n, qs, sq.n, 0.0f, tile.data(), nk);  // S = scale Q K^T
      for (int r = 0; r < rows; ++r) {
        float* p = tile.data() + (int64_t)r * nk;
        ls[r] = softmax_row(p, keep.data(), row_key(slice, (uint32_t)(i0 + r)), nk, threshold, conv, &inverse[r]);
      }
      gemm('N', 'N', dv, rows, nk, 1.0f, vs, sv.n, tile.data(), nk, 0.0f, os, so.n);  // O = exp(S - max) V
      for (int r = 0; r < rows; ++r) {  // ... / sum
        float* o = os + r * so.n;
        const float factor = inverse[r];
#pragma omp simd
        for (int c = 0; c < dv; ++c) o[c] *= factor;
      }
    }
  }
  return 0;
}

int dropkey_cpu_backward(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv,
                         const float* out, Strides so, const float* lse, const float* grad, Strides sg,
                         float* grad_q, Strides sgq, float* grad_k, Strides sgk, float* grad_v, Strides sgv,
                         Shape shape, float scale, uint64_t seed, uint32_t threshold, int conv, int threads) {
  if (shape.nq < 1 || shape.nk < 1 || shape.d < 1 || shape.dv < 1 || conv < 0 || conv > 2 || threads < 1) return 1;
  const int nq = shape.nq, nk = shape.nk, d = shape.d, dv = shape.dv;
  const int64_t heads = shape.heads, slices = shape.batch * shape.heads;
  const int rows_per_block = block_rows(nq, nk);
#pragma omp parallel num_threads(threads)
  {
    SequentialBlas sequential;
    std::vector<float> weights((size_t)rows_per_block * nk), dlogits((size_t)rows_per_block * nk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < slices; ++s) {
      const float* qs = at(q, sq, s, heads);
      const float* ks = at(k, sk, s, heads);
      const float* vs = at(v, sv, s, heads);
      const float* os = at(out, so, s, heads);
      const float* gs = at(grad, sg, s, heads);
      float* gqs = at(grad_q, sgq, s, heads);
      float* gks = at(grad_k, sgk, s, heads);
      float* gvs = at(grad_v, sgv, s, heads);
      const float* ls = lse + s * nq;
      const uint32_t slice = slice_key(seed, (uint32_t)s);
      for (int i0 = 0; i0 < nq; i0 += rows_per_block) {
        const int rows = std::min(rows_per_block, nq - i0);
        const float accumulate = i0 == 0 ? 0.0f : 1.0f;
        const float* qb = qs + i0 * sq.n;
        const float* gb = gs + i0 * sg.n;
        gemm('T', 'N', nk, rows, d, scale, ks, sk.n, qb, sq.n, 0.0f, weights.data(), nk);  // S
        gemm('T', 'N', nk, rows, dv, 1.0f, vs, sv.n, gb, sg.n, 0.0f, dlogits.data(), nk);  // dP = dO V^T
        for (int r = 0; r < rows; ++r) {
          const int i = i0 + r;
          float* p = weights.data() + (int64_t)r * nk;
          float* dp = dlogits.data() + (int64_t)r * nk;
          const float* o = os + i * so.n;
          const float* g = gs + i * sg.n;
          float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
          for (int c = 0; c < dv; ++c) delta += o[c] * g[c];
          const float l = ls[i];
          const uint32_t row = row_key(slice, (uint32_t)i);
          // flags, weights P = keep * exp(S - lse) and dS = P (dP - delta), in one pass
          int kept = 0;
#pragma omp simd reduction(+ : kept)
          for (int j = 0; j < nk; ++j) {
            const int k = kept_flag(row, j, threshold);
            kept += k;
            const float e = exp_nonpositive(k ? p[j] - l : 0.0f) * (float)k;
            p[j] = e;
            dp[j] = e * (dp[j] - delta);
          }
          if (kept > 0) continue;
          if (conv != 2) {  // weights 0 or 1/Nk, independent of the logits: dS = 0
            std::fill(p, p + nk, conv == 0 ? 0.0f : 1.0f / (float)nk);
            std::fill(dp, dp + nk, 0.0f);
            continue;
          }
          // "undropped": the plain softmax of the row (rare: probability r^Nk). Its logits and dP
          // were overwritten above, so they are recomputed here by dot products.
          const float* qi = qs + i * sq.n;
          for (int j = 0; j < nk; ++j) {
            const float* kj = ks + j * sk.n;
            const float* vj = vs + j * sv.n;
            float logit = 0.0f, dpj = 0.0f;
            for (int c = 0; c < d; ++c) logit += qi[c] * kj[c];
            for (int c = 0; c < dv; ++c) dpj += g[c] * vj[c];
            const float e = exp_nonpositive(scale * logit - l);
            p[j] = e;
            dp[j] = e * (dpj - delta);
          }
        }
        gemm('N', 'T', dv, nk, rows, 1.0f, gb, sg.n, weights.data(), nk, accumulate, gvs, sgv.n);   // dV += P^T dO
        gemm('N', 'N', d, rows, nk, scale, ks, sk.n, dlogits.data(), nk, 0.0f, gqs + i0 * sgq.n, sgq.n);  // dQ
        gemm('N', 'T', d, nk, rows, scale, qb, sq.n, dlogits.data(), nk, accumulate, gks, sgk.n);  // dK += dS^T Q
      }
    }
  }
  return 0;
}

}  // extern "C"
