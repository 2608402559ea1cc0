"""Checkpoints for long runs: written atomically, loaded safely, checked against the run they resume.

- Files hold plain tensors, numbers, strings, lists and dicts, and are read with
  ``torch.load(weights_only=True)``: a crafted file cannot run code.
- A save writes a temporary file beside the target and renames it over the target, so a
  crash never leaves a half-written checkpoint; temporary files of interrupted writes
  (their process gone) are removed by the next save, and a failed save removes its own.
- A run's identity (``identity`` below) covers every option that changes its result and a
  fingerprint of its data (:func:`fingerprint`); resuming with any of them different is
  refused, naming what differs.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import re

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another kind, or of another run."""


# --------------------------------------------------------------------------- writing
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: str) -> None:
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        m = re.fullmatch(r"\.tmp(\d+)", tmp[len(path):])
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.remove(tmp)
            except OSError:
                pass


def save(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash never leaves a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a file to write to")
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- reading
def read(path: str, kind: str = "checkpoint") -> dict:
    """The dict saved at ``path``, loaded without running code; a one-line :class:`CheckpointError`
    naming the file when it is missing, a directory, truncated, corrupt or not a fastdd file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{kind} {path} is a directory, not a file")
    if not os.path.exists(path):
        raise CheckpointError(f"{kind} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, a pickle of arbitrary objects, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects other than tensors, numbers, strings, lists and dicts " \
                     "(refused: loading it could run code)"
        raise CheckpointError(f"{kind} {path} cannot be read: {reason[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
        raise CheckpointError(f"{kind} {path} is not a fastdd file (no identity record)")
    return state


def load(path: str | None, identity: dict) -> dict | None:
    """The saved state at ``path`` if it exists and was written by the same run.

    ``identity`` holds what must match (method, options, data fingerprints, seed, ...); a
    mismatch raises :class:`CheckpointError` naming every field that differs instead of
    silently mixing two runs.
    """
    if not path or not os.path.lexists(path):
        return None
    state = read(path)
    saved = _flatten(state["identity"])
    mine = _flatten(fingerprint(identity))
    differ = [k for k in sorted(set(saved) | set(mine)) if saved.get(k, "<absent>") != mine.get(k, "<absent>")]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {_short(saved.get(k, '<absent>'))}, this run {_short(mine.get(k, '<absent>'))}"
                          for k in differ[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise CheckpointError(f"checkpoint {path} belongs to another run: {shown}{more}; "
                              "delete it or pass another checkpoint path")
    return state


def check_progress(path: str, done: int, wanted: int, what: str) -> None:
    """Refuse to resume a run that went further than this one asks for (it would return the longer run)."""
    if done > wanted:
        raise CheckpointError(f"checkpoint {path} already holds {done} {what}, more than the {wanted} asked for; "
                              f"ask for at least {done}, or delete it to start over")


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "identity": obj}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- identities
_SAMPLE = 1 << 16  # elements hashed from a tensor, evenly strided over it


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Shape, dtype, float64 sum and a hash of an evenly strided sample of ``t``: equal data gives
    equal fingerprints, and data of the same size that differs almost surely does not."""
    t = t.detach().cpu()
    flat = t.reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step].contiguous()
    if sample.dtype == torch.bool:
        sample = sample.to(torch.uint8)
    digest = hashlib.sha1(sample.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    total = float(flat.sum(dtype=torch.float64)) if flat.numel() and not flat.dtype.is_complex else 0.0
    return f"tensor{list(t.shape)} {str(t.dtype).replace('torch.', '')} sum={total:.10g} sha1={digest}"


def fingerprint(obj, _depth: int = 0):
    """A plain (JSON-like) description of ``obj`` for a run's identity: numbers and strings as they
    are, tensors and arrays by :func:`tensor_fingerprint`, modules by class and weights, functions
    by name and the values they close over, other objects by class and attributes."""
    if _depth > 6:
        return type(obj).__qualname__
    nxt = _depth + 1
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, np.generic):
        return fingerprint(obj.item(), nxt)
    if isinstance(obj, torch.Tensor):
        return tensor_fingerprint(obj)
    if isinstance(obj, np.ndarray):
        return tensor_fingerprint(torch.as_tensor(obj)) if obj.dtype != object else repr(obj.tolist())[:200]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): fingerprint(v, nxt) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [fingerprint(v, nxt) for v in obj]
    if isinstance(obj, torch.nn.Module):
        return {"module": type(obj).__qualname__, "state": fingerprint(obj.state_dict(), nxt)}
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__code__"):  # a function or lambda: its name and what it closes over
        cells = [c.cell_contents for c in (obj.__closure__ or ()) if _filled(c)]
        return {"function": f"{obj.__module__}.{obj.__qualname__}", "closure": fingerprint(cells, nxt),
                "defaults": fingerprint(list(obj.__defaults__ or ()), nxt)}
    if hasattr(obj, "__func__") and hasattr(obj, "__self__"):  # a bound method
        return {"method": obj.__func__.__qualname__, "of": fingerprint(obj.__self__, nxt)}
    if hasattr(obj, "__dict__"):
        fields = {k: v for k, v in vars(obj).items() if not k.startswith("__")}
        return {"object": f"{type(obj).__module__}.{type(obj).__qualname__}", "fields": fingerprint(fields, nxt)}
    return repr(obj)[:200]


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True
