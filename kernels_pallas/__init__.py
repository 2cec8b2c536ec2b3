"""Pallas GPU attention kernels (Triton and Mosaic GPU lowerings): SSA and causal Full, forward and backward.

Nothing in this package imports loza_jax: the attention registry's adapters live in
loza_jax/attention_pallas.py.
"""
from kernels_pallas.flash import flash_attention

__all__ = ["flash_attention"]
