"""What the benchmarks share: writing the markdown table, reading a process's memory, CUDA timing."""
from __future__ import annotations

import json
import os


def write_report(path: str | None, lines: list) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# glibc keeps freed memory in its heap instead of returning it to the kernel: page faults of
# large temporaries otherwise swing CPU timings here by up to 1.5x (set for timing children)
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def rss_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs); a no-op where it is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cuda_median_seconds(fn, repeat: int = 20) -> float:
    """Median over ``repeat`` calls of ``fn`` timed with CUDA events, after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def peak_tensor_bytes(fn) -> tuple[int, object]:
    """``(peak, result)``: the largest number of bytes held at once by tensor storages that ``fn``
    allocated while it ran (autograd's saved activations, gradients, temporaries, the result),
    counted op by op through a dispatch mode: exact and independent of the allocator, unlike RSS.
    Allocations inside a kernel that never become tensors (oneDNN scratch) are not seen."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.multiprocessing.reductions import StorageWeakRef

    import torch

    live: dict = {}  # storage weak ref -> bytes
    peak = [0]

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref not in live:
                        live[ref] = t.untyped_storage().nbytes()
            for ref in [r for r in live if r.expired()]:
                del live[ref]
            peak[0] = max(peak[0], sum(live.values()))
            return out

    with Tracker():
        result = fn()
    return peak[0], result


class Results:
    """Finished runs on disk (``results.json``): nothing computed is lost to an interruption.
    ``sort_keys=False`` keeps the order entries were made in (a table's row order)."""

    def __init__(self, path, sort_keys: bool = True):
        self.path, self.sort_keys = path, sort_keys
        self.data = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=self.sort_keys)
        os.replace(tmp, self.path)
