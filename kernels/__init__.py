"""Triton kernels of fastdd, one module per op (installed as ``fastdd.kernels``).

Importing a module here imports triton; ``fastdd`` itself imports them only when a
Triton backend is picked for a call.
"""
