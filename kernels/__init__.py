"""Triton update kernels."""
