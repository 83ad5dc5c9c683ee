"""Models built from moekit layers."""

from moekit.models.lm import KVCache, LMConfig, MoETransformerLM
from moekit.models.multitask import CGC, PLE, MMoE, MultiTaskConfig, OMoE, ReplicaStack, SharedBottom

__all__ = [
    "CGC",
    "KVCache",
    "LMConfig",
    "MMoE",
    "MoETransformerLM",
    "MultiTaskConfig",
    "OMoE",
    "PLE",
    "ReplicaStack",
    "SharedBottom",
]
