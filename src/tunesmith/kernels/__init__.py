"""Kernels: fused layers with their plain-PyTorch equivalents."""
