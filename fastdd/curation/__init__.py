"""Data curation: keep the highest-quality examples."""
from .quality import QualityFilter

__all__ = ["QualityFilter"]
