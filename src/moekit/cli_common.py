"""Pieces every ``moekit`` subcommand module shares: the help layout and the --json line."""

from __future__ import annotations

import argparse
import json
from typing import Any


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """Keep the hand-wrapped description and epilog; align option help at column 32."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def print_json(payload: dict[str, Any]) -> None:
    """The --json result: one compact JSON object on one line, flushed."""
    print(json.dumps(payload, separators=(",", ":")), flush=True)
