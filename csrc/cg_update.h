// Launcher interface of csrc/cg_update.cu (raw pointers and a stream handle).
#pragma once
#include <cstdint>

// x += alpha p; r -= alpha Ap; rz[k] += sum_i r_ik z_ik with z = r * inv_diag (or r).
// Vectors are fp32 [P, K] contiguous; alpha [K]; inv_diag [P] or null; rz [K] zeroed by the caller.
int cg_update_xr_launch(float* x, float* r, const float* p, const float* ap, const float* alpha,
                        const float* inv_diag, float* rz, int64_t P, int64_t K, int64_t stream);
// p = z + beta p with z = r * inv_diag (or r).
int cg_update_p_launch(float* p, const float* r, const float* beta, const float* inv_diag,
                       int64_t P, int64_t K, int64_t stream);
