/* CPU kernels built at first use by fastdd/_cpu.py (plain C, called through ctypes).
 *
 * Materializing per-sample gradients on a CPU is bound by writing them: the MLP workload writes
 * 523 MB per call. Ordinary stores first read each destination line into the cache (read for
 * ownership) and then evict it; streaming (non-temporal) stores write lines straight to memory.
 * On the 2-core CI machine: 21 GB/s streamed against 11-14 GB/s for torch's own fill_.
 * Worth it only for outputs far larger than the cache, which the caller decides. */
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* 512 with AVX-512, 256 with AVX, 0 without streaming stores (the caller then keeps torch's path). */
int fastdd_stream_bits(void) {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX__)
  return 256;
#else
  return 0;
#endif
}

/* out[i, r, :] = g[i, r] * a[i, :] for samples i in [i0, i1): each sample's Linear weight
 * gradient at T = 1 (an outer product), g [B, p], a [B, d], out [B, p, d], all contiguous fp32.
 * Rows are streamed from their first 64-byte boundary; heads and tails use ordinary stores. */
void fastdd_outer_stream(const float *g, const float *a, float *out, int64_t i0, int64_t i1, int64_t p,
                         int64_t d) {
  for (int64_t i = i0; i < i1; i++) {
    const float *ai = a + i * d;
    for (int64_t r = 0; r < p; r++) {
      float *dst = out + (i * p + r) * d;
      const float s = g[i * p + r];
      int64_t j = 0;
      while (j < d && ((uintptr_t)(dst + j) & 63)) {
        dst[j] = s * ai[j];
        j++;
      }
#if defined(__AVX512F__)
      const __m512 vs = _mm512_set1_ps(s);
      for (; j + 16 <= d; j += 16) _mm512_stream_ps(dst + j, _mm512_mul_ps(vs, _mm512_loadu_ps(ai + j)));
#elif defined(__AVX__)
      const __m256 vs = _mm256_set1_ps(s);
      for (; j + 8 <= d; j += 8) _mm256_stream_ps(dst + j, _mm256_mul_ps(vs, _mm256_loadu_ps(ai + j)));
#endif
      for (; j < d; j++) dst[j] = s * ai[j];
    }
  }
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence(); /* streamed lines are visible to other threads once this call returns */
#endif
}
