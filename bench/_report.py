"""Writing a benchmark's markdown table to the file the user named."""
from __future__ import annotations

import os


def write_report(path: str | None, lines: list) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
