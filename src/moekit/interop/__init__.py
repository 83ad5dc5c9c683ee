"""Interoperability with other libraries' checkpoints (Hugging Face transformers)."""

from moekit.interop.hf import from_hf_block, from_hf_model, load_hf_checkpoint, to_hf_model
from moekit.interop.patch import patch_moe

__all__ = ["from_hf_block", "from_hf_model", "load_hf_checkpoint", "patch_moe", "to_hf_model"]
