// Fused batched-CG updates over K right-hand sides (fp32 [P, K] contiguous vectors).
// Plain CUDA C++ without torch headers; csrc/bindings.cpp passes pointers and a stream.
//
// Threads walk the [P, K] elements in memory order (coalesced). Each block keeps a
// shared-memory accumulator per column for r . z and adds it to the global [K] sums
// with one atomic per column: K <= 8192 columns fit in 32 KB of shared memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "cg_update.h"

namespace {

constexpr int THREADS = 256;
constexpr int64_t MAX_K_SHARED = 8192;

__global__ void __launch_bounds__(THREADS) cg_update_xr_kernel(
    float* __restrict__ x, float* __restrict__ r, const float* __restrict__ p, const float* __restrict__ ap,
    const float* __restrict__ alpha, const float* __restrict__ inv_diag, float* __restrict__ rz,
    int64_t P, int64_t K) {
  extern __shared__ float rz_block[];  // [K]
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) rz_block[k] = 0.f;
  __syncthreads();
  const int64_t n = P * K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / K, k = e - i * K;
    const float a = alpha[k];
    x[e] += a * p[e];
    const float ri = r[e] - a * ap[e];
    r[e] = ri;
    const float zi = inv_diag ? ri * inv_diag[i] : ri;
    atomicAdd(&rz_block[k], ri * zi);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) atomicAdd(&rz[k], rz_block[k]);
}

__global__ void __launch_bounds__(THREADS) cg_update_p_kernel(
    float* __restrict__ p, const float* __restrict__ r, const float* __restrict__ beta,
    const float* __restrict__ inv_diag, int64_t P, int64_t K) {
  const int64_t n = P * K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / K, k = e - i * K;
    const float zi = inv_diag ? r[e] * inv_diag[i] : r[e];
    p[e] = zi + beta[k] * p[e];
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + THREADS - 1) / THREADS;
  return unsigned(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

}  // namespace

int cg_update_xr_launch(float* x, float* r, const float* p, const float* ap, const float* alpha,
                        const float* inv_diag, float* rz, int64_t P, int64_t K, int64_t stream) {
  if (K > MAX_K_SHARED) return -1;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cg_update_xr_kernel<<<blocks_for(P * K), THREADS, size_t(K) * sizeof(float), s>>>(
      x, r, p, ap, alpha, inv_diag, rz, P, K);
  return static_cast<int>(cudaGetLastError());
}

int cg_update_p_launch(float* p, const float* r, const float* beta, const float* inv_diag,
                       int64_t P, int64_t K, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cg_update_p_kernel<<<blocks_for(P * K), THREADS, 0, s>>>(p, r, beta, inv_diag, P, K);
  return static_cast<int>(cudaGetLastError());
}
