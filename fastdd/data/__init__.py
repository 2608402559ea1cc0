"""Data: scikit-learn's bundled digits (no download) and synthetic generators."""
from .digits import load_digits, make_blobs_images

__all__ = ["load_digits", "make_blobs_images"]
