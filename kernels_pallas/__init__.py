"""Pallas GPU attention kernels (Triton lowering): SSA and causal Full, forward and backward."""
from kernels_pallas.flash import flash_attention

__all__ = ["flash_attention"]
