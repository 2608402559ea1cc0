"""Data curation: keep the highest-quality examples, drop semantic near-duplicates."""
from .quality import QualityFilter
from .semdedup import SemDeDupResult, semdedup

__all__ = ["QualityFilter", "SemDeDupResult", "semdedup"]
