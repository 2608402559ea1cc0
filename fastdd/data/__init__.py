"""Data: scikit-learn's bundled digits (no download) and synthetic generators."""
from .digits import Split, load_digits, make_blobs_images, stratified_split
from .files import DataFileError, load_data_file

__all__ = ["DataFileError", "Split", "load_data_file", "load_digits", "make_blobs_images", "stratified_split"]
