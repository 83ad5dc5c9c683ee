"""Generation helpers that do not depend on where a model comes from (sampling, timed decoding)."""

from moekit.inference.generate import GenerationResult, SamplingConfig, sample_next_token, timed_generate

__all__ = ["GenerationResult", "SamplingConfig", "sample_next_token", "timed_generate"]
