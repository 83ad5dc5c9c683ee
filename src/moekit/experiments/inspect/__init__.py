"""``moekit inspect``: what the experts of a trained MoE LM learned, as the MoE papers show it
(Mixtral §5, OpenMoE §4, ST-MoE §7). record.py collects the routing, metrics.py computes the
figures' numbers as pure functions, report.py writes report.html, the PNGs and routing.json."""

from moekit.experiments.inspect.record import InspectError
from moekit.experiments.inspect.run import run_inspect

__all__ = ["InspectError", "run_inspect"]
