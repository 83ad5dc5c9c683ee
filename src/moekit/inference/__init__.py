"""Generation helpers that do not depend on where a model comes from (sampling, timed decoding),
and models larger than memory: the expert store, the byte-budget expert cache, ``load``."""

from moekit.inference.generate import GenerationResult, SamplingConfig, sample_next_token, timed_generate
from moekit.inference.offload import load, minimum_budget, parse_size
from moekit.inference.store import ExpertStore, StoreError, write_store

__all__ = [
    "ExpertStore",
    "GenerationResult",
    "SamplingConfig",
    "StoreError",
    "load",
    "minimum_budget",
    "parse_size",
    "sample_next_token",
    "timed_generate",
    "write_store",
]
