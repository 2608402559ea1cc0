// Launcher interface of csrc/mmd.cu (raw pointers and a stream handle).
#pragma once
#include <cstdint>

// Rows of x (fp32 [N, D]) are grouped by class: class c owns [seg[c], seg[c + 1]).
// out (fp32 [C, D]) = per-class mean rows.
int segment_mean_launch(const float* x, const int64_t* seg, float* out, int64_t C, int64_t D, int64_t stream);
// Backward: out (fp32 [N, D]) rows of class c = g[c] / |c|.
int segment_mean_bwd_launch(const float* g, const int64_t* seg, float* out, int64_t C, int64_t D, int64_t stream);
// RBF kernel sums within each class: q (fp32 [Nq, D]) row i of class q_cls[i] against the rows
// [kseg[c], kseg[c + 1]) of k (fp32 [Nk, D]). Without weights (wq == nullptr):
//   out[i] = sum_j exp(-gamma |q_i - k_j|^2)                                      (out fp32 [Nq])
// with weights wq [Nq], wk [Nk]: the gradient with respect to q of sum_ij wq_i wk_j exp(...):
//   out[i, :] = -2 gamma sum_j W_ij (q_i - k_j),  W_ij = wq_i wk_j exp(...)        (out fp32 [Nq, D])
// D is at most RBF_MAX_D (shared memory holds q_i and per-warp partial sums).
constexpr int64_t RBF_MAX_D = 2048;
int rbf_launch(const float* q, const float* k, const int64_t* q_cls, const int64_t* kseg, const float* wq,
               const float* wk, float* out, int64_t Nq, int64_t D, float gamma, int64_t stream);
