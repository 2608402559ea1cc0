"""K-FAC and EK-FAC curvature for influence functions (Martens & Grosse 2015; George et al. 2018;
Grosse et al. 2023).

For a Linear or (one-group) Conv2d layer with inputs A (bias: a column of ones; conv: the
unfolded patches, one row per output position) and output gradients G, the Fisher of the
average loss is approximated per layer by ``S_G (x) S_A`` (K-FAC; for T positions per sample
``T * S_G (x) S_A`` with both covariances averaged over positions), whose eigenbasis is
``Q_G (x) Q_A``. EK-FAC keeps that basis and replaces the eigenvalues by the exact second moment
of the per-sample gradients in it: ``Lambda = mean_n (Q_G^T G_n^T A_n Q_A)^2``. The inverse
Hessian-vector product of a layer's gradient matrix V ``[p, d]`` is then
``Q_G ((Q_G^T V Q_A) / (Lambda + lambda)) Q_A^T``: no iteration, no HVP.

The output gradients are those of the true Fisher: with labels sampled from the model's
predictive distribution (``fisher="sampled"``, cross-entropy only), or exactly in expectation
over labels, one backward per output dimension through the square root of the loss's Hessian
in the outputs (``fisher="ggn"``: K-FAC of the Gauss-Newton matrix), or with the true labels
(``fisher="empirical"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..grad.engine import _Capture
from ..grad.rules import _conv_patches

SUPPORTED = (nn.Linear, nn.Conv2d)
FISHERS = ("sampled", "ggn", "empirical")


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


@dataclass
class LayerFactors:
    """One layer's eigenbasis and eigenvalues; ``weight``/``bias``: full parameter names."""

    name: str
    weight: str
    bias: str | None
    Q_A: torch.Tensor  # [d_aug, d_aug]
    Q_G: torch.Tensor  # [p, p]
    lam: torch.Tensor  # [p, d_aug] eigenvalues of the Fisher block in Q_G (x) Q_A
    damping: float = 0.0

    def inverse_product(self, V: torch.Tensor) -> torch.Tensor:
        """``(F + damping I)^-1`` applied to ``V [K, p, d_aug]``."""
        R = self.Q_G.T @ V @ self.Q_A
        R = R / (self.lam + self.damping)
        return self.Q_G @ R @ self.Q_A.T


def layer_tensors(module: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [B, T, d_aug]`` (ones appended for a bias) and ``G [B, T, p]`` of a captured call."""
    B = x.shape[0]
    if isinstance(module, nn.Linear):
        A = x.reshape(B, -1, module.in_features).to(dtype)
        G = g.reshape(B, -1, module.out_features).to(dtype)
    else:
        A = _conv_patches(module, x.to(dtype))[:, 0]  # [B, L, C_in k_h k_w]
        G = g.reshape(B, module.out_channels, -1).transpose(1, 2).to(dtype)
    if module.bias is not None:
        A = torch.cat([A, A.new_ones(A.shape[0], A.shape[1], 1)], 2)
    return A, G


def _output_vectors(outputs: torch.Tensor, targets: torch.Tensor, loss_fn, fisher: str, gen) -> list[torch.Tensor]:
    """Per backward, the vectors ``[B, C]`` whose pull-back through the model gives the output
    gradients of that Fisher (one for sampled/empirical, C for ggn)."""
    out = outputs.detach()
    if fisher == "ggn":
        def one(o, t):
            return loss_fn(o.unsqueeze(0), t.unsqueeze(0)).sum()

        H = torch.func.vmap(torch.func.hessian(one))(out, targets)  # [B, C, C]
        evals, evecs = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # H = root root^T
        return [root[:, :, k] for k in range(root.shape[2])]
    if fisher == "sampled":
        probs = torch.softmax(out.double(), 1)
        # drawn on the CPU from a seeded generator (the same labels on every device)
        targets = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(out.device)
    with torch.enable_grad():
        o = out.clone().requires_grad_(True)
        v, = torch.autograd.grad(loss_fn(o, targets).sum(), o)
    return [v]


def _passes(model, batches, modules, loss_fn, fisher, gen, dtype, progress, desc):
    """For each batch and each backward of the chosen Fisher (ggn: one per output dimension),
    ``(k, [(module, A, G), ...])`` over the captured calls of ``modules``."""
    selected = {n: p for m in modules for n, p in _module_params(model, m).items()}
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for xb, yb in it:
        with _Capture(model, selected, grad_hooks=False) as cap, torch.enable_grad():
            outputs = model(xb)
            vectors = _output_vectors(outputs, yb, loss_fn, fisher, gen)
            edges = [e for c in cap.calls for e in c.edges]
            for k, v in enumerate(vectors):
                # (outputs . v).sum() has output gradient v: its pull-back is J^T v per sample
                grads = torch.autograd.grad((outputs * v.to(outputs.dtype)).sum(), edges, allow_unused=True,
                                            retain_graph=k < len(vectors) - 1)
                pos = 0
                calls = []
                for c in cap.calls:
                    g = grads[pos]
                    pos += len(c.edges)
                    if c.module in modules and g is not None:
                        calls.append((c.module, *layer_tensors(c.module, c.x, g, dtype)))
                yield k, calls


def _module_params(model, module) -> dict:
    """{full name: parameter} of ``module``'s own trainable parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for p in module.parameters(recurse=False) if p.requires_grad}


def fit_factors(model: nn.Module, batches, loss_fn, modules: dict[str, nn.Module], fisher: str = "sampled",
                correct: bool = True, damping: float | None = None, seed: int = 0, dtype=torch.float64,
                progress: bool = False) -> list[LayerFactors]:
    """K-FAC (``correct=False``) or EK-FAC factors of ``modules`` (``{name: module}``) over
    ``batches`` of ``(x, y)``. ``damping=None``: per layer 0.1 times the mean eigenvalue
    (kronfluence's heuristic)."""
    gen = torch.Generator().manual_seed(seed)
    mods = set(modules.values())
    S_A = {m: 0 for m in mods}  # sum over positions of a a^T (once per sample)
    S_G = {m: 0 for m in mods}  # sum over positions and the Fisher's backwards of g g^T
    tokens = {m: 0 for m in mods}
    n_samples = sum(len(yb) for _, yb in batches)
    for k, calls in _passes(model, batches, mods, loss_fn, fisher, gen, dtype, progress, "K-FAC covariances"):
        for m, A, G in calls:
            if k == 0:
                S_A[m] = S_A[m] + torch.einsum("btd,bte->de", A, A)
                tokens[m] += A.shape[0] * A.shape[1]
            S_G[m] = S_G[m] + torch.einsum("btp,btq->pq", G, G)
    factors = []
    for name, m in modules.items():
        if not tokens[m]:
            raise ValueError(f"layer '{name}' was never called in the model's forward")
        eig_A, Q_A = torch.linalg.eigh(S_A[m] / tokens[m])
        eig_G, Q_G = torch.linalg.eigh(S_G[m] / tokens[m])
        T = tokens[m] / n_samples  # positions per sample: F ~ T * S_G (x) S_A
        lam = T * torch.outer(eig_G.clamp_min(0), eig_A.clamp_min(0))
        params = _module_params(model, m)
        weight = next(n_ for n_, p in params.items() if p is m.weight)
        bias = next((n_ for n_, p in params.items() if m.bias is not None and p is m.bias), None)
        factors.append(LayerFactors(name, weight, bias, Q_A, Q_G, lam))
    if correct:  # EK-FAC: the per-sample gradients' second moment in the Kronecker eigenbasis
        by_module = dict(zip(modules.values(), factors))
        lam = {m: torch.zeros_like(f.lam) for m, f in by_module.items()}
        for _, calls in _passes(model, batches, mods, loss_fn, fisher, gen, dtype, progress, "EK-FAC eigenvalues"):
            for m, A, G in calls:
                f = by_module[m]
                AQ, GQ = A @ f.Q_A, G @ f.Q_G
                if A.shape[1] == 1:  # (Q_G^T g)(Q_A^T a)^T squared = outer product of squares
                    lam[m] += GQ[:, 0].square().T @ AQ[:, 0].square()
                else:
                    for s in range(0, A.shape[0], 32):
                        lam[m] += torch.bmm(GQ[s:s + 32].transpose(1, 2), AQ[s:s + 32]).square().sum(0)
        for m, f in by_module.items():
            f.lam = lam[m] / n_samples
    for f in factors:
        f.damping = 0.1 * float(f.lam.mean()) if damping is None else float(damping)
        f.damping = max(f.damping, 1e-12)
    return factors
