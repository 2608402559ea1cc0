"""Data: one loader for the sets users hold (files, image folders, torch Datasets), scikit-learn's
bundled digits (no download) and synthetic generators."""
from .digits import Split, load_digits, make_blobs_images, stratified_split
from .files import DataFileError, load_data_file
from .sources import Dataset, Normalization, load

__all__ = ["DataFileError", "Dataset", "Normalization", "Split", "load", "load_data_file", "load_digits",
           "make_blobs_images", "stratified_split"]
