// Torch bindings of fastdd's CUDA kernels. Only torch's CPU headers are included: the
// kernels take raw pointers and a stream handle (an int from Python), so this file
// compiles against a CPU build of torch too (DESIGN.md section 3).
#include <torch/extension.h>

#include "cg_update.h"
#include "grad_distance.h"
#include "mmd.h"
#include "per_sample_linear.h"

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return PSG_F32;
    case torch::kBFloat16: return PSG_BF16;
    case torch::kHalf: return PSG_F16;
    default: TORCH_CHECK(false, "fastdd CUDA kernels take float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

PsgLinearArgs pair_args(const torch::Tensor& A, const torch::Tensor& G, int64_t stream) {
  TORCH_CHECK(A.is_cuda() && G.is_cuda(), "A and G must be CUDA tensors");
  TORCH_CHECK(A.dim() == 3 && G.dim() == 3, "A must be [B, T, d] and G [B, T, p]");
  TORCH_CHECK(A.size(0) == G.size(0) && A.size(1) == G.size(1), "A and G must agree on [B, T]");
  TORCH_CHECK(A.scalar_type() == G.scalar_type(), "A and G must share a dtype");
  PsgLinearArgs a{};
  a.A = A.data_ptr();
  a.G = G.data_ptr();
  a.B = A.size(0); a.T = A.size(1); a.d = A.size(2); a.p = G.size(2); a.K = 0;
  a.s_ab = A.stride(0); a.s_at = A.stride(1); a.s_ad = A.stride(2);
  a.s_gb = G.stride(0); a.s_gt = G.stride(1); a.s_gp = G.stride(2);
  a.stream = stream;
  return a;
}

void check_launch(int code) {
  TORCH_CHECK(code == 0, "fastdd CUDA kernel launch failed: ",
              code < 0 ? "unsupported op or dtype" : psg_cuda_error_string(code));
}

void psg_linear(torch::Tensor A, torch::Tensor G, torch::Tensor out, int64_t stream) {
  PsgLinearArgs a = pair_args(A, G, stream);
  TORCH_CHECK(out.scalar_type() == A.scalar_type(), "out must have the dtype of A");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == a.B && out.size(1) == a.p && out.size(2) == a.d,
              "out must be [B, p, d]");
  a.X = out.data_ptr();
  a.s_xb = out.stride(0); a.s_xp = out.stride(1); a.s_xd = out.stride(2);
  check_launch(psg_linear_launch(PSG_MATERIALIZE, dtype_code(A), a));
}

void psg_linear_sqnorm(torch::Tensor A, torch::Tensor G, torch::Tensor out, int64_t stream) {
  PsgLinearArgs a = pair_args(A, G, stream);
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.numel() == a.B, "out must be float32 [B]");
  auto part = torch::empty({a.B, psg_linear_num_tiles(a.d, a.p)}, out.options());
  a.out = part.data_ptr();
  check_launch(psg_linear_launch(PSG_SQNORM, dtype_code(A), a));
  out.copy_(part.sum(1));
}

void psg_linear_dot(torch::Tensor A, torch::Tensor G, torch::Tensor V, torch::Tensor out, int64_t stream) {
  PsgLinearArgs a = pair_args(A, G, stream);
  TORCH_CHECK(V.dim() == 3 && V.size(1) == a.p && V.size(2) == a.d, "V must be [K, p, d]");
  TORCH_CHECK(V.scalar_type() == A.scalar_type(), "V must have the dtype of A");
  a.K = V.size(0);
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.size(0) == a.B && out.size(1) == a.K,
              "out must be float32 [B, K]");
  a.X = V.data_ptr();
  a.s_xb = V.stride(0); a.s_xp = V.stride(1); a.s_xd = V.stride(2);
  auto part = torch::empty({a.B, psg_linear_num_tiles(a.d, a.p), a.K}, out.options());
  a.out = part.data_ptr();
  check_launch(psg_linear_launch(PSG_DOT, dtype_code(A), a));
  out.copy_(part.sum(1));
}

void check_cg_vec(const torch::Tensor& t, const char* name, int64_t P, int64_t K) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == P && t.size(1) == K, name, " must be [P, K]");
}

const float* optional_diag(const c10::optional<torch::Tensor>& d, int64_t P) {
  if (!d.has_value()) return nullptr;
  TORCH_CHECK(d->is_cuda() && d->scalar_type() == torch::kFloat && d->is_contiguous() && d->numel() == P,
              "inv_diag must be a contiguous float32 CUDA tensor [P]");
  return d->data_ptr<float>();
}

torch::Tensor cg_update_xr(torch::Tensor x, torch::Tensor r, torch::Tensor p, torch::Tensor ap,
                           torch::Tensor alpha, c10::optional<torch::Tensor> inv_diag, int64_t stream) {
  const int64_t P = x.size(0), K = x.size(1);
  check_cg_vec(x, "x", P, K); check_cg_vec(r, "r", P, K); check_cg_vec(p, "p", P, K); check_cg_vec(ap, "Ap", P, K);
  TORCH_CHECK(alpha.is_cuda() && alpha.scalar_type() == torch::kFloat && alpha.numel() == K, "alpha must be float32 [K]");
  auto rz = torch::zeros({K}, x.options());
  check_launch(cg_update_xr_launch(x.data_ptr<float>(), r.data_ptr<float>(), p.data_ptr<float>(), ap.data_ptr<float>(),
                                   alpha.contiguous().data_ptr<float>(), optional_diag(inv_diag, P), rz.data_ptr<float>(),
                                   P, K, stream));
  return rz;
}

void cg_update_p(torch::Tensor p, torch::Tensor r, torch::Tensor beta, c10::optional<torch::Tensor> inv_diag,
                 int64_t stream) {
  const int64_t P = p.size(0), K = p.size(1);
  check_cg_vec(p, "p", P, K); check_cg_vec(r, "r", P, K);
  TORCH_CHECK(beta.is_cuda() && beta.scalar_type() == torch::kFloat && beta.numel() == K, "beta must be float32 [K]");
  check_launch(cg_update_p_launch(p.data_ptr<float>(), r.data_ptr<float>(), beta.contiguous().data_ptr<float>(),
                                  optional_diag(inv_diag, P), P, K, stream));
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CUDA tensor");
}

void check_i64(const torch::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous int64 CUDA tensor of ", n, " entries");
}

void row_stats(torch::Tensor a, torch::Tensor b, torch::Tensor off, torch::Tensor len, torch::Tensor out,
               int64_t stream) {
  check_f32(a, "a"); check_f32(b, "b"); check_f32(out, "out");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes(), "a and b must be [C, P] of one shape");
  const int64_t C = a.size(0), P = a.size(1), R = off.numel();
  check_i64(off, "offsets", R); check_i64(len, "lengths", R);
  TORCH_CHECK(out.numel() == C * R * 4, "out must be [C, R, 4]");
  check_launch(row_stats_launch(a.data_ptr<float>(), b.data_ptr<float>(), off.data_ptr<int64_t>(),
                                len.data_ptr<int64_t>(), out.data_ptr<float>(), C, P, R, stream));
}

void row_axpby(torch::Tensor a, torch::Tensor b, torch::Tensor c1, torch::Tensor c2, torch::Tensor off,
               torch::Tensor len, torch::Tensor out, int64_t stream) {
  check_f32(a, "a"); check_f32(b, "b"); check_f32(c1, "c1"); check_f32(c2, "c2"); check_f32(out, "out");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && out.sizes() == a.sizes(), "a, b, out must be [C, P]");
  const int64_t C = a.size(0), P = a.size(1), R = off.numel();
  check_i64(off, "offsets", R); check_i64(len, "lengths", R);
  TORCH_CHECK(c1.numel() == C * R && c2.numel() == C * R, "c1 and c2 must be [C, R]");
  check_launch(row_axpby_launch(a.data_ptr<float>(), b.data_ptr<float>(), c1.data_ptr<float>(), c2.data_ptr<float>(),
                                off.data_ptr<int64_t>(), len.data_ptr<int64_t>(), out.data_ptr<float>(), C, P, R, stream));
}

void segment_mean(torch::Tensor x, torch::Tensor seg, torch::Tensor out, int64_t stream) {
  check_f32(x, "x"); check_f32(out, "out");
  TORCH_CHECK(x.dim() == 2, "x must be [N, D]");
  const int64_t C = seg.numel() - 1, D = x.size(1);
  check_i64(seg, "segments", C + 1);
  TORCH_CHECK(out.numel() == C * D, "out must be [C, D]");
  check_launch(segment_mean_launch(x.data_ptr<float>(), seg.data_ptr<int64_t>(), out.data_ptr<float>(), C, D, stream));
}

void segment_mean_bwd(torch::Tensor g, torch::Tensor seg, torch::Tensor out, int64_t stream) {
  check_f32(g, "g"); check_f32(out, "out");
  const int64_t C = seg.numel() - 1, D = g.size(1);
  check_i64(seg, "segments", C + 1);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == C && out.dim() == 2 && out.size(1) == D, "g must be [C, D], out [N, D]");
  check_launch(segment_mean_bwd_launch(g.data_ptr<float>(), seg.data_ptr<int64_t>(), out.data_ptr<float>(), C, D, stream));
}

void rbf(torch::Tensor q, torch::Tensor k, torch::Tensor q_cls, torch::Tensor kseg, c10::optional<torch::Tensor> wq,
         c10::optional<torch::Tensor> wk, torch::Tensor out, double gamma, int64_t stream) {
  check_f32(q, "q"); check_f32(k, "k"); check_f32(out, "out");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "q and k must be [N, D] with one D");
  const int64_t Nq = q.size(0), D = q.size(1);
  TORCH_CHECK(D <= RBF_MAX_D, "the CUDA RBF kernel takes D <= ", RBF_MAX_D, ", got ", D);
  check_i64(q_cls, "q_cls", Nq);
  TORCH_CHECK(wq.has_value() == wk.has_value(), "pass both weights or neither");
  const float* wq_p = nullptr;
  const float* wk_p = nullptr;
  if (wq.has_value()) {
    check_f32(*wq, "wq"); check_f32(*wk, "wk");
    TORCH_CHECK(wq->numel() == Nq && wk->numel() == k.size(0), "wq must be [Nq] and wk [Nk]");
    TORCH_CHECK(out.numel() == Nq * D, "out must be [Nq, D]");
    wq_p = wq->data_ptr<float>(); wk_p = wk->data_ptr<float>();
  } else {
    TORCH_CHECK(out.numel() == Nq, "out must be [Nq]");
  }
  check_launch(rbf_launch(q.data_ptr<float>(), k.data_ptr<float>(), q_cls.data_ptr<int64_t>(), kseg.data_ptr<int64_t>(),
                          wq_p, wk_p, out.data_ptr<float>(), Nq, D, static_cast<float>(gamma), stream));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdd CUDA kernels";
  m.def("psg_linear", &psg_linear, "per-sample Linear gradients G_b^T A_b into out [B, p, d]");
  m.def("psg_linear_sqnorm", &psg_linear_sqnorm, "squared norms [B] of per-sample Linear gradients");
  m.def("psg_linear_dot", &psg_linear_dot, "dots [B, K] of per-sample Linear gradients with V [K, p, d]");
  m.def("cg_update_xr", &cg_update_xr, "fused CG step x += alpha p, r -= alpha Ap; returns r.z per column");
  m.def("cg_update_p", &cg_update_p, "fused CG direction update p = z + beta p");
  m.def("row_stats", &row_stats, "per (class, segment) [a.b, a.a, b.b, |a-b|^2] of packed gradients");
  m.def("row_axpby", &row_axpby, "out = c1 a + c2 b per (class, segment): the gradient-distance backward");
  m.def("segment_mean", &segment_mean, "per-class mean rows of class-grouped embeddings");
  m.def("segment_mean_bwd", &segment_mean_bwd, "backward of segment_mean");
  m.def("rbf", &rbf, "within-class RBF kernel row sums, or their gradient with respect to q");
}
