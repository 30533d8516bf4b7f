"""Triton kernels, one file per op (installed as ``pymerge.kernels``)."""
