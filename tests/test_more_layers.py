"""The models users bring beyond the hand-written rules: each served by the torch.func fallback
(or a rule) with the answer of the definition, a per-sample autograd loop; sequence-first
tensors and RNN hidden states (batch at dim 1) included; a torch.compile-wrapped model."""
import warnings

import pytest
import torch
from torch import nn

import fastdd
from fastdd.grad import clipped_grad

from helpers import loop_per_sample_grads

B = 4


class HFConv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a Linear with a transposed weight [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Head(nn.Module):
    def __init__(self, body, flat):
        super().__init__()
        self.body, self.fc = body, nn.Linear(flat, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # x [B, T, 8]
        if not self.batch_first:
            x = x.transpose(0, 1)
        o, _ = self.att(x, x, x)
        return self.fc((o if self.batch_first else o.transpose(0, 1)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(6, 5, batch_first=batch_first)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, 6]
        o, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.fc((o if self.batch_first else o.transpose(0, 1))[:, -1])


class SequenceFirstLinear(nn.Module):
    """A Linear applied to [T, B, d]: its rule would take T for the batch; torch.func serves it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x [B, T, 6]
        return self.fc(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


def _hook_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of the parametrization; still in use
        return nn.utils.weight_norm(module)


CASES = {
    "ConvTranspose1d": lambda: (Head(nn.ConvTranspose1d(2, 3, 3, stride=2), 3 * 11), torch.randn(B, 2, 5)),
    "ConvTranspose2d": lambda: (Head(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), 3 * 9 * 9),
                                torch.randn(B, 2, 5, 5)),
    "Conv3d": lambda: (Head(nn.Conv3d(2, 3, 3, padding=1), 3 * 64), torch.randn(B, 2, 4, 4, 4)),
    "RMSNorm": lambda: (Head(nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6)), 6), torch.randn(B, 6)),
    "MultiheadAttention batch_first": lambda: (Attention(True), torch.randn(B, 5, 8)),
    "MultiheadAttention sequence-first": lambda: (Attention(False), torch.randn(B, 5, 8)),
    "LSTM batch_first": lambda: (Recurrent("LSTM", True), torch.randn(B, 7, 6)),
    "LSTM sequence-first": lambda: (Recurrent("LSTM", False), torch.randn(B, 7, 6)),
    "GRU batch_first": lambda: (Recurrent("GRU", True), torch.randn(B, 7, 6)),
    "GRU sequence-first": lambda: (Recurrent("GRU", False), torch.randn(B, 7, 6)),
    "RNN, B = T": lambda: (Recurrent("RNN", False), torch.randn(B, B, 6)),  # dim 0 and 1 both B: batch_first decides
    "HF Conv1D": lambda: (Head(HFConv1D(5, 6), 5), torch.randn(B, 6)),
    "sequence-first Linear": lambda: (SequenceFirstLinear(), torch.randn(B, 7, 6)),
    # a Linear whose own parameters are weight_g / weight_v (no rule), and one whose weight a
    # parametrization computes from parameters its call sees no sample of (whole-model fallback)
    "weight_norm (hook)": lambda: (Head(_hook_weight_norm(nn.Linear(6, 5)), 5), torch.randn(B, 6)),
    "weight_norm (parametrization)": lambda: (
        Head(nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)), 5), torch.randn(B, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_the_per_sample_loop(case):
    torch.manual_seed(0)
    model, x = CASES[case]()
    y = torch.randint(0, 3, (B,))
    expected = loop_per_sample_grads(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GRU: torch.func cannot vmap it (the fallback says so once)
        got = fastdd.per_sample_grads(model, x, y)
        norms = fastdd.per_sample_grad_norms(model, x, y)
        clipped = clipped_grad(model, x, y, max_norm=0.1)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, msg=n)
    exact_norms = sum(g.flatten(1).square().sum(1) for g in expected.values()).sqrt()
    torch.testing.assert_close(norms, exact_norms, atol=1e-5, rtol=1e-4)
    factors = (0.1 / (exact_norms + 1e-6)).clamp(max=1.0)
    for n in expected:
        torch.testing.assert_close(clipped[n], torch.tensordot(factors, expected[n], dims=1), atol=1e-6, rtol=1e-4,
                                   msg=n)


@pytest.mark.parametrize("case", list(CASES))
def test_clipped_step_without_parameter_gradients(case):
    # PerSampleGrads(param_grads=False) runs rule layers with detached parameters: a module whose
    # parameter another module reads directly (MultiheadAttention's out_proj), a rule module that
    # torch.func serves (sequence-first Linear) and fallback layers must still clip exactly
    torch.manual_seed(0)
    model, x = CASES[case]()
    y = torch.randint(0, 3, (B,))
    expected = loop_per_sample_grads(model, x, y)
    norms = sum(g.flatten(1).square().sum(1) for g in expected.values()).sqrt()
    factors = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    with warnings.catch_warnings(), fastdd.PerSampleGrads(model, loss_reduction="sum", param_grads=False) as ps:
        warnings.simplefilter("ignore")
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        ps.clipped_grad(0.1, write_grad=True)
    for n, p in model.named_parameters():
        assert type(p) is nn.Parameter, n
        torch.testing.assert_close(p.grad, torch.tensordot(factors, expected[n], dims=1), atol=1e-6, rtol=1e-4,
                                   msg=n)


def test_gru_fallback_says_it_loops():
    from fastdd.grad import engine

    engine._NO_VMAP.discard(nn.GRU)
    torch.manual_seed(0)
    model, x = CASES["GRU batch_first"]()
    with pytest.warns(UserWarning, match="torch.func cannot vmap GRU .*loop over samples"):
        fastdd.per_sample_grads(model, x, torch.randint(0, 3, (B,)))


def test_compiled_model_works_and_is_checked():
    torch.manual_seed(0)
    model = Head(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)), 5)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing without a C++ toolchain
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    expected = loop_per_sample_grads(model, x, y)
    got = fastdd.per_sample_grads(compiled, x, y)
    for n, g in expected.items():
        torch.testing.assert_close(got[f"_orig_mod.{n}"], g, atol=1e-5, rtol=1e-4, msg=n)
    report = fastdd.grad.check(compiled, x, y)
    assert report.ok and all(p.path.startswith("rule (") for p in report.params)
    # a clipped step whose backward skips the weight gradients, through the compiled model
    norms = sum(g.flatten(1).square().sum(1) for g in expected.values()).sqrt()
    factors = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    with fastdd.PerSampleGrads(compiled, loss_reduction="sum", param_grads=False) as ps:
        compiled.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x), y, reduction="sum").backward()
        assert all(p.grad is None for p in model.parameters())
        ps.clipped_grad(0.1, write_grad=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.tensordot(factors, expected[n], dims=1), atol=1e-6, rtol=1e-4, msg=n)
