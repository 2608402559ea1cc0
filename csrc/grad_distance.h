// Launcher interface of csrc/grad_distance.cu (raw pointers and a stream handle).
#pragma once
#include <cstdint>

// Per (segment r, class c): out[c, r, :] = [a.b, a.a, b.b, |a - b|^2] over the segment
// [off[r], off[r] + len[r]) of row c of the fp32 [C, P] inputs a and b. out is fp32 [C, R, 4].
int row_stats_launch(const float* a, const float* b, const int64_t* off, const int64_t* len, float* out,
                     int64_t C, int64_t P, int64_t R, int64_t stream);
// out[c, seg r] = c1[c, r] a + c2[c, r] b; c1, c2 fp32 [C, R]; out fp32 [C, P].
int row_axpby_launch(const float* a, const float* b, const float* c1, const float* c2, const int64_t* off,
                     const int64_t* len, float* out, int64_t C, int64_t P, int64_t R, int64_t stream);
