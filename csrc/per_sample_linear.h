// Launcher interface of csrc/per_sample_linear.cu: raw pointers, strides and a stream
// handle, so that the binding file needs no CUDA headers.
#pragma once
#include <cstdint>

enum PsgOp { PSG_MATERIALIZE = 0, PSG_SQNORM = 1, PSG_DOT = 2 };
enum PsgDtype { PSG_F32 = 0, PSG_BF16 = 1, PSG_F16 = 2 };

struct PsgLinearArgs {
  const void* A;  // A [B, T, d], element strides s_ab, s_at, s_ad
  const void* G;  // G [B, T, p], element strides s_gb, s_gt, s_gp
  void* X;        // materialize: out [B, p, d]; dot: V [K, p, d]; strides s_xb, s_xp, s_xd
  void* out;      // sqnorm: fp32 [B, n_tiles]; dot: fp32 [B, n_tiles, K]
  int64_t B, T, d, p, K;
  int64_t s_ab, s_at, s_ad, s_gb, s_gt, s_gp, s_xb, s_xp, s_xd;
  int64_t stream;  // cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream)
};

// Tiles per sample of the sqnorm and dot partial sums.
int64_t psg_linear_num_tiles(int64_t d, int64_t p);
// Launches op on the stream; returns 0 or a cudaError_t code.
int psg_linear_launch(int op, int dtype, const PsgLinearArgs& args);
const char* psg_cuda_error_string(int code);
