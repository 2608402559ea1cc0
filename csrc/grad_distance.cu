// Fused class-wise gradient distance (DC's matching loss): segment statistics and their
// backward. Plain CUDA C++ without torch headers; csrc/bindings.cpp passes pointers and a stream.
//
// One block per (segment, class) pair: blockIdx.x is the segment (unbounded axis),
// blockIdx.y the class. Threads stride over the segment (coalesced) and keep four fp32
// partial sums, reduced by warp shuffles and then across warps in shared memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "grad_distance.h"

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(THREADS) row_stats_kernel(
    const float* __restrict__ a, const float* __restrict__ b, const int64_t* __restrict__ off,
    const int64_t* __restrict__ len, float* __restrict__ out, int64_t P, int64_t R) {
  const int64_t r = blockIdx.x, c = blockIdx.y;
  const int64_t base = c * P + off[r], n = len[r];
  float ab = 0.f, aa = 0.f, bb = 0.f, dd = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += THREADS) {
    const float x = a[base + k], y = b[base + k], d = x - y;
    ab += x * y; aa += x * x; bb += y * y; dd += d * d;
  }
  __shared__ float part[4][WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  ab = warp_sum(ab); aa = warp_sum(aa); bb = warp_sum(bb); dd = warp_sum(dd);
  if (lane == 0) { part[0][warp] = ab; part[1][warp] = aa; part[2][warp] = bb; part[3][warp] = dd; }
  __syncthreads();
  if (threadIdx.x < 4) {
    float s = 0.f;
    for (int w = 0; w < WARPS; ++w) s += part[threadIdx.x][w];
    out[(c * R + r) * 4 + threadIdx.x] = s;
  }
}

__global__ void __launch_bounds__(THREADS) row_axpby_kernel(
    const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ c1,
    const float* __restrict__ c2, const int64_t* __restrict__ off, const int64_t* __restrict__ len,
    float* __restrict__ out, int64_t P, int64_t R) {
  const int64_t r = blockIdx.x, c = blockIdx.y;
  const int64_t base = c * P + off[r], n = len[r];
  const float k1 = c1[c * R + r], k2 = c2[c * R + r];
  for (int64_t k = threadIdx.x; k < n; k += THREADS) out[base + k] = k1 * a[base + k] + k2 * b[base + k];
}

}  // namespace

int row_stats_launch(const float* a, const float* b, const int64_t* off, const int64_t* len, float* out,
                     int64_t C, int64_t P, int64_t R, int64_t stream) {
  if (C > 65535) return -1;
  if (R == 0 || C == 0) return 0;
  row_stats_kernel<<<dim3(unsigned(R), unsigned(C)), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, b, off, len, out, P, R);
  return static_cast<int>(cudaGetLastError());
}

int row_axpby_launch(const float* a, const float* b, const float* c1, const float* c2, const int64_t* off,
                     const int64_t* len, float* out, int64_t C, int64_t P, int64_t R, int64_t stream) {
  if (C > 65535) return -1;
  if (R == 0 || C == 0) return 0;
  row_axpby_kernel<<<dim3(unsigned(R), unsigned(C)), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, b, c1, c2, off, len, out, P, R);
  return static_cast<int>(cudaGetLastError());
}
