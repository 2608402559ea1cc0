// Class-wise MMD pieces: per-class mean embeddings (linear-kernel MMD) and RBF-kernel sums
// whose N x M kernel matrix never exists. Plain CUDA C++ without torch headers.
//
// segment_mean: one thread per embedding column (coalesced), looping over the class's rows.
// rbf: one block per query row i, its row cached in shared memory; each warp takes one key
// at a time, its lanes split D (coalesced) and a shuffle reduction gives the exact squared
// distance (no |q|^2 + |k|^2 - 2 q.k cancellation). For the gradient each warp also
// accumulates W_ij k_j into its own shared-memory row; warps are summed at the end.
#include <cuda_runtime.h>

#include <cstdint>

#include "mmd.h"

namespace {

constexpr int COLS = 128;
constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

__global__ void segment_mean_kernel(const float* __restrict__ x, const int64_t* __restrict__ seg,
                                    float* __restrict__ out, int64_t D) {
  const int64_t c = blockIdx.y, d = int64_t(blockIdx.x) * COLS + threadIdx.x;
  if (d >= D) return;
  const int64_t lo = seg[c], hi = seg[c + 1];
  float s = 0.f;
  for (int64_t i = lo; i < hi; ++i) s += x[i * D + d];
  out[c * D + d] = s / float(hi > lo ? hi - lo : 1);
}

__global__ void segment_mean_bwd_kernel(const float* __restrict__ g, const int64_t* __restrict__ seg,
                                        float* __restrict__ out, int64_t D) {
  const int64_t c = blockIdx.y, d = int64_t(blockIdx.x) * COLS + threadIdx.x;
  if (d >= D) return;
  const int64_t lo = seg[c], hi = seg[c + 1];
  const float v = g[c * D + d] / float(hi > lo ? hi - lo : 1);
  for (int64_t i = lo; i < hi; ++i) out[i * D + d] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the sum
}

template <bool GRAD>
__global__ void __launch_bounds__(THREADS) rbf_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const int64_t* __restrict__ q_cls,
    const int64_t* __restrict__ kseg, const float* __restrict__ wq, const float* __restrict__ wk,
    float* __restrict__ out, int64_t D, float gamma) {
  extern __shared__ float smem[];
  float* qi = smem;           // [D]
  float* acc = smem + D;      // [WARPS][D] (gradient only)
  __shared__ float row_part[WARPS];
  const int64_t i = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t d = threadIdx.x; d < D; d += THREADS) {
    qi[d] = q[i * D + d];
    if (GRAD)
      for (int w = 0; w < WARPS; ++w) acc[w * D + d] = 0.f;
  }
  __syncthreads();
  const int64_t c = q_cls[i], lo = kseg[c], hi = kseg[c + 1];
  float row = 0.f;  // sum_j W_ij, kept by lane 0 of each warp
  for (int64_t j = lo + warp; j < hi; j += WARPS) {
    const float* kj = k + j * D;
    float s = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float t = qi[d] - kj[d];
      s += t * t;
    }
    float w = expf(-gamma * warp_sum(s));
    if (GRAD) {
      w *= wk[j];
      for (int64_t d = lane; d < D; d += 32) acc[warp * D + d] += w * kj[d];
    }
    row += w;
  }
  if (lane == 0) row_part[warp] = row;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < WARPS; ++w) total += row_part[w];
  if (!GRAD) {
    if (threadIdx.x == 0) out[i] = total;
    return;
  }
  const float scale = -2.f * gamma * wq[i];
  for (int64_t d = threadIdx.x; d < D; d += THREADS) {
    float v = 0.f;
    for (int w = 0; w < WARPS; ++w) v += acc[w * D + d];
    out[i * D + d] = scale * (qi[d] * total - v);
  }
}

}  // namespace

int segment_mean_launch(const float* x, const int64_t* seg, float* out, int64_t C, int64_t D, int64_t stream) {
  if (C > 65535) return -1;
  if (C == 0 || D == 0) return 0;
  const dim3 grid(unsigned((D + COLS - 1) / COLS), unsigned(C));
  segment_mean_kernel<<<grid, COLS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(x, seg, out, D);
  return static_cast<int>(cudaGetLastError());
}

int segment_mean_bwd_launch(const float* g, const int64_t* seg, float* out, int64_t C, int64_t D, int64_t stream) {
  if (C > 65535) return -1;
  if (C == 0 || D == 0) return 0;
  const dim3 grid(unsigned((D + COLS - 1) / COLS), unsigned(C));
  segment_mean_bwd_kernel<<<grid, COLS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(g, seg, out, D);
  return static_cast<int>(cudaGetLastError());
}

int rbf_launch(const float* q, const float* k, const int64_t* q_cls, const int64_t* kseg, const float* wq,
               const float* wk, float* out, int64_t Nq, int64_t D, float gamma, int64_t stream) {
  if (D > RBF_MAX_D || Nq > 2147483647LL) return -1;
  if (Nq == 0) return 0;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (wq == nullptr) {
    rbf_kernel<false><<<unsigned(Nq), THREADS, size_t(D) * sizeof(float), s>>>(q, k, q_cls, kseg, wq, wk, out, D, gamma);
  } else {
    const size_t bytes = size_t(D) * (1 + WARPS) * sizeof(float);  // at most 40 KB for D = 2048
    rbf_kernel<true><<<unsigned(Nq), THREADS, bytes, s>>>(q, k, q_cls, kseg, wq, wk, out, D, gamma);
  }
  return static_cast<int>(cudaGetLastError());
}
