"""CUDA sources of the fastdd extension (built by fastdd._ext)."""
