"""Losses: tensors in, tensors out."""
