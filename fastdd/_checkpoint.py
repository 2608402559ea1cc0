"""Checkpoints for long runs: written atomically, checked against the run they resume."""
from __future__ import annotations

import os

import torch


def save(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash never leaves a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | None, identity: dict) -> dict | None:
    """The saved state at ``path`` if it exists and was written by the same run.

    ``identity`` holds what must match (method, sizes, seed, ...); a mismatch raises an
    error naming the field instead of silently mixing two runs.
    """
    if not path or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key, value in identity.items():
        if state.get("identity", {}).get(key) != value:
            raise ValueError(f"checkpoint {path} belongs to another run: {key}={state.get('identity', {}).get(key)!r}, "
                             f"this run has {value!r}; delete it or pass another checkpoint path")
    return state
