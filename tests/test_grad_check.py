"""fastdd.grad.check: per parameter, the path that served it and its error against torch.func;
a wrong rule is caught."""
import pytest
import torch
from torch import nn

import fastdd
from fastdd.grad import rules
from fastdd.models import ConvNet


class Mixed(nn.Module):
    """A rule (Linear), a module fallback (PReLU) and a weight also used outside its module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 4)
        self.act = nn.PReLU()
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = self.act(self.emb(x))
        return self.head(h[:, -1]) * self.scale + x[:, 0, :3] @ self.emb.weight[:3, :3]


def test_check_reports_each_path_and_agrees():
    torch.manual_seed(0)
    report = fastdd.grad.check(Mixed(), torch.randn(8, 7, 6), torch.randint(0, 3, (8,)))
    paths = {p.name: p.path for p in report.params}
    assert paths["head.weight"] == "rule (Linear)" and paths["emb.bias"] == "rule (Linear)"
    assert paths["act.weight"] == "module fallback (PReLU 'act')"
    assert paths["scale"] == "whole-model fallback (torch.func)"
    assert paths["emb.weight"] == "whole-model fallback (torch.func)"  # used directly too: the graph decides
    assert report.ok and all(p.max_rel_error < 1e-5 for p in report.params)
    assert report.engine_seconds > 0 and report.reference_seconds > 0
    text = str(report)
    assert "module fallback (PReLU 'act')" in text and "all parameters agree" in text


def test_check_in_float64_with_a_zero_gradient_bias():
    torch.manual_seed(0)
    model = ConvNet(1, 10, 8, width=4, depth=2).double()  # conv biases before norms: zero gradient
    report = fastdd.grad.check(model, torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,)))
    assert report.ok and report.rtol == 1e-10
    assert all(p.path.startswith("rule (") for p in report.params)


def test_check_catches_a_wrong_rule(monkeypatch):
    original = rules.LinearRule.materialize

    def doubled(self, m, x, g, out=None):
        return {k: 2 * v for k, v in original(self, m, x, g).items()}

    monkeypatch.setattr(rules.LinearRule, "materialize", doubled)
    torch.manual_seed(0)
    report = fastdd.grad.check(Mixed(), torch.randn(8, 7, 6), torch.randint(0, 3, (8,)))
    bad = {p.name for p in report.params if not p.ok}
    assert not report.ok and {"head.weight", "head.bias", "emb.bias"} <= bad and "act.weight" not in bad
    assert "MISMATCH" in str(report)
