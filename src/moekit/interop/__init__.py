"""Interoperability with other libraries' checkpoints (Hugging Face transformers)."""

from moekit.interop.hf import from_hf_block, from_hf_model, load_hf_checkpoint, to_hf_model

__all__ = ["from_hf_block", "from_hf_model", "load_hf_checkpoint", "to_hf_model"]
