"""moekit: sparse Mixture-of-Experts layers and models for PyTorch."""

from moekit.config import MoEConfig
from moekit.layer import MoE, aux_loss, routing_stats, update_expert_bias

__all__ = ["MoEConfig", "MoE", "aux_loss", "routing_stats", "update_expert_bias"]
__version__ = "0.1.0"
