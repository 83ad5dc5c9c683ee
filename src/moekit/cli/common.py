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


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="also print the figures as one JSON object on the last line"
    )


def case_list(text: str) -> list[str]:
    keys = [key.strip() for key in text.replace(" ", ",").split(",") if key.strip()]
    if not keys:
        raise argparse.ArgumentTypeError("expected case numbers such as 1,3")
    return keys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def print_help(parser: argparse.ArgumentParser) -> int:
    """A command group called without a subcommand: its help, exit status 2."""
    parser.print_help()
    return 2
