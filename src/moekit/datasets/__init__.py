"""Datasets for moekit's benchmarks."""

from moekit.datasets.census import CensusData, fetch_census, load_census

__all__ = ["CensusData", "fetch_census", "load_census"]
