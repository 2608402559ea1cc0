"""Oracles shared by the tests."""
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def ce_losses(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def vmap_per_sample_grads(model, inputs, targets, loss_fn=ce_losses, names=None):
    """The torch.func oracle: vmap(grad(loss of one sample))."""
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}
    buffers = dict(model.named_buffers())

    def loss_one(p, x, y):
        out = functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))[0]

    # functional_call can leave plain tensors behind in a module shared at two paths
    saved = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()]
    try:
        return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="same")(params, inputs, targets)
    finally:
        for m, n, p in saved:
            m._parameters[n] = p


def loop_per_sample_grads(model, inputs, targets, loss_fn=ce_losses):
    """The definition, for models vmap cannot run: each sample's own loss, differentiated alone."""
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1])[0], list(params.values()))
            for i in range(len(targets))]
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(params)}


def flat_sq_norms(grads):
    return sum(g.flatten(1).double().square().sum(1) for g in grads.values())
