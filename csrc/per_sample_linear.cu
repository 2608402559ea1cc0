// Per-sample Linear gradients G_b^T A_b (A [B, T, d], G [B, T, p]) and their fused
// consumers: materialize into out [B, p, d], squared norm, dots with V [K, p, d].
//
// Plain CUDA C++: no torch headers (DESIGN.md section 3), so this file compiles with
// nvcc alone; csrc/bindings.cpp passes raw pointers, strides and a stream handle.
//
// Each 256-thread block owns a 64 x 64 tile (p x d) of one sample's gradient; each
// thread accumulates a 4 x 4 sub-tile in fp32 registers over T in steps of 16, with
// the A and G blocks staged in shared memory. The norm and dot epilogues reduce the
// tile in registers and shared memory: the per-sample gradient never reaches memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "per_sample_linear.h"

namespace {

constexpr int TILE = 64;    // rows (p) and columns (d) of a block's tile
constexpr int STEP_T = 16;  // rows of T staged per shared-memory step
constexpr int SUB = 4;      // each thread owns SUB x SUB outputs
constexpr int THREADS = (TILE / SUB) * (TILE / SUB);

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

struct Shape {
  int64_t T, d, p, K;
  int64_t s_ab, s_at, s_ad;  // strides of A
  int64_t s_gb, s_gt, s_gp;  // strides of G
  int64_t s_ob, s_op, s_od;  // strides of out (materialize) or V: s_vk, s_vp, s_vd
};

// acc[i][j] = (G_b^T A_b)[p0 + ty*SUB + i, d0 + tx*SUB + j], accumulated in fp32.
template <typename scalar_t>
__device__ void grad_tile(const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                          const Shape& s, int64_t b, int64_t p0, int64_t d0,
                          float acc[SUB][SUB]) {
  __shared__ float a_s[STEP_T][TILE];
  __shared__ float g_s[STEP_T][TILE];
  const int tx = threadIdx.x % (TILE / SUB), ty = threadIdx.x / (TILE / SUB);
  for (int i = 0; i < SUB; ++i)
    for (int j = 0; j < SUB; ++j) acc[i][j] = 0.f;
  for (int64_t t0 = 0; t0 < s.T; t0 += STEP_T) {
    // 256 threads stage 16 x 64 values of each of A and G (4 each).
    for (int e = threadIdx.x; e < STEP_T * TILE; e += THREADS) {
      const int r = e / TILE, c = e % TILE;
      const int64_t t = t0 + r;
      const bool in_t = t < s.T;
      a_s[r][c] = (in_t && d0 + c < s.d) ? to_f32(A[b * s.s_ab + t * s.s_at + (d0 + c) * s.s_ad]) : 0.f;
      g_s[r][c] = (in_t && p0 + c < s.p) ? to_f32(G[b * s.s_gb + t * s.s_gt + (p0 + c) * s.s_gp]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < STEP_T; ++r) {
      float gv[SUB], av[SUB];
#pragma unroll
      for (int i = 0; i < SUB; ++i) gv[i] = g_s[r][ty * SUB + i];
#pragma unroll
      for (int j = 0; j < SUB; ++j) av[j] = a_s[r][tx * SUB + j];
#pragma unroll
      for (int i = 0; i < SUB; ++i)
#pragma unroll
        for (int j = 0; j < SUB; ++j) acc[i][j] += gv[i] * av[j];
    }
    __syncthreads();
  }
}

// Sum of one float per thread over the block; thread 0 gets the total.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[THREADS / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) materialize_kernel(
    const scalar_t* __restrict__ A, const scalar_t* __restrict__ G, scalar_t* __restrict__ out, Shape s) {
  const int64_t b = blockIdx.x, p0 = int64_t(blockIdx.y) * TILE, d0 = int64_t(blockIdx.z) * TILE;
  float acc[SUB][SUB];
  grad_tile(A, G, s, b, p0, d0, acc);
  const int tx = threadIdx.x % (TILE / SUB), ty = threadIdx.x / (TILE / SUB);
  for (int i = 0; i < SUB; ++i) {
    const int64_t pi = p0 + ty * SUB + i;
    if (pi >= s.p) continue;
    for (int j = 0; j < SUB; ++j) {
      const int64_t dj = d0 + tx * SUB + j;
      if (dj < s.d) out[b * s.s_ob + pi * s.s_op + dj * s.s_od] = from_f32<scalar_t>(acc[i][j]);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) sqnorm_kernel(
    const scalar_t* __restrict__ A, const scalar_t* __restrict__ G, float* __restrict__ part, Shape s) {
  // part [B, gridDim.y * gridDim.z]: this tile's share of ||G_b^T A_b||^2
  const int64_t b = blockIdx.x, p0 = int64_t(blockIdx.y) * TILE, d0 = int64_t(blockIdx.z) * TILE;
  float acc[SUB][SUB];
  grad_tile(A, G, s, b, p0, d0, acc);
  float v = 0.f;  // out-of-range entries are exact zeros: masked loads stage 0
  for (int i = 0; i < SUB; ++i)
    for (int j = 0; j < SUB; ++j) v += acc[i][j] * acc[i][j];
  const float total = block_sum(v);
  if (threadIdx.x == 0) part[b * gridDim.y * gridDim.z + blockIdx.y * gridDim.z + blockIdx.z] = total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) dot_kernel(
    const scalar_t* __restrict__ A, const scalar_t* __restrict__ G, const scalar_t* __restrict__ V,
    float* __restrict__ part, Shape s) {
  // part [B, n_tiles, K]: this tile's share of <G_b^T A_b, V_k>; the tile is built once for all K
  const int64_t b = blockIdx.x, p0 = int64_t(blockIdx.y) * TILE, d0 = int64_t(blockIdx.z) * TILE;
  float acc[SUB][SUB];
  grad_tile(A, G, s, b, p0, d0, acc);
  const int tx = threadIdx.x % (TILE / SUB), ty = threadIdx.x / (TILE / SUB);
  const int64_t n_tiles = int64_t(gridDim.y) * gridDim.z;
  const int64_t tile = int64_t(blockIdx.y) * gridDim.z + blockIdx.z;
  for (int64_t k = 0; k < s.K; ++k) {
    float v = 0.f;
    for (int i = 0; i < SUB; ++i) {
      const int64_t pi = p0 + ty * SUB + i;
      if (pi >= s.p) continue;
      for (int j = 0; j < SUB; ++j) {
        const int64_t dj = d0 + tx * SUB + j;
        if (dj < s.d) v += acc[i][j] * to_f32(V[k * s.s_ob + pi * s.s_op + dj * s.s_od]);
      }
    }
    const float total = block_sum(v);
    if (threadIdx.x == 0) part[(b * n_tiles + tile) * s.K + k] = total;
  }
}

Shape make_shape(const PsgLinearArgs& a) {
  return Shape{a.T, a.d, a.p, a.K,
               a.s_ab, a.s_at, a.s_ad, a.s_gb, a.s_gt, a.s_gp, a.s_xb, a.s_xp, a.s_xd};
}

// Samples on x (up to 2^31 - 1 blocks); p and d tiles on y and z (65,535 each: p, d < 4M).
dim3 grid_of(const PsgLinearArgs& a) {
  return dim3(unsigned(a.B), unsigned((a.p + TILE - 1) / TILE), unsigned((a.d + TILE - 1) / TILE));
}

template <typename scalar_t>
int launch(int op, const PsgLinearArgs& a) {
  const Shape s = make_shape(a);
  const dim3 grid = grid_of(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const auto* A = static_cast<const scalar_t*>(a.A);
  const auto* G = static_cast<const scalar_t*>(a.G);
  switch (op) {
    case PSG_MATERIALIZE:
      materialize_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(A, G, static_cast<scalar_t*>(a.X), s);
      break;
    case PSG_SQNORM:
      sqnorm_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(A, G, static_cast<float*>(a.out), s);
      break;
    case PSG_DOT:
      dot_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(A, G, static_cast<const scalar_t*>(a.X),
                                                          static_cast<float*>(a.out), s);
      break;
    default:
      return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t psg_linear_num_tiles(int64_t d, int64_t p) {
  return ((d + TILE - 1) / TILE) * ((p + TILE - 1) / TILE);
}

int psg_linear_launch(int op, int dtype, const PsgLinearArgs& args) {
  switch (dtype) {
    case PSG_F32: return launch<float>(op, args);
    case PSG_BF16: return launch<__nv_bfloat16>(op, args);
    case PSG_F16: return launch<__half>(op, args);
    default: return -1;
  }
}

const char* psg_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
