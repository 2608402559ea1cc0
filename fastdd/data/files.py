"""A user's data set from a ``.npz`` / ``.pt`` file as a :class:`~fastdd.data.digits.Split` of raw values.

:func:`fastdd.data.load` reads these files (and image folders and torch Datasets) and standardizes
uint8 pixels; ``load_data_file`` is the same reader with every value used as given (float64 stays
float64, anything else becomes float32), for code that wants the plain four tensors::

    numpy.savez("data.npz", X=images, y=labels)      # or torch.save({"X": ..., "y": ...}, "data.pt")
"""
from __future__ import annotations

import os

from .digits import Split


class DataFileError(ValueError):
    """A data file that is missing, unreadable, or not in the documented format."""


def load_data_file(path: str, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The train/test split of a ``.npz`` / ``.pt`` file, values as given (see the module doc)."""
    from .sources import load

    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file")
    d = load(path, test_fraction=test_fraction, seed=seed, normalize=False)
    return Split(d.X_train, d.y_train, d.X_test, d.y_test)
