"""moekit: sparse Mixture-of-Experts layers and models for PyTorch."""

from moekit.config import MoEConfig
from moekit.layer import MoE, aux_loss, routing_stats, update_expert_bias

__all__ = ["MoEConfig", "MoE", "aux_loss", "routing_stats", "update_expert_bias"]
# NOTE: the one source of the version: pyproject.toml reads it (setuptools dynamic version,
# `attr = "moekit.__version__"`, parsed without importing torch), `moekit --version` prints it.
__version__ = "0.1.0"
