"""Models built from moekit layers."""

from moekit.models.lm import KVCache, LMConfig, MoETransformerLM

__all__ = ["KVCache", "LMConfig", "MoETransformerLM"]
