// Torch bindings of fastdd's CUDA kernels. Only torch's CPU headers are included: the
// kernels take raw pointers and a stream handle (an int from Python), so this file
// compiles against a CPU build of torch too (DESIGN.md section 3).
#include <torch/extension.h>

#include "cg_update.h"
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdd CUDA kernels";
  m.def("psg_linear", &psg_linear, "per-sample Linear gradients G_b^T A_b into out [B, p, d]");
  m.def("psg_linear_sqnorm", &psg_linear_sqnorm, "squared norms [B] of per-sample Linear gradients");
  m.def("psg_linear_dot", &psg_linear_dot, "dots [B, K] of per-sample Linear gradients with V [K, p, d]");
  m.def("cg_update_xr", &cg_update_xr, "fused CG step x += alpha p, r -= alpha Ap; returns r.z per column");
  m.def("cg_update_p", &cg_update_p, "fused CG direction update p = z + beta p");
}
