"""Pieces every ``moekit`` subcommand module shares: the parser class and help layout, --json
output, and flag validation with messages that name the flag.

--json: ``json_output`` (entered by ``moekit.cli.main.main`` for a subcommand given --json whose
parser was made with ``add_json_flag(parser, document=True)``)
sends whatever a command prints for people to stderr, and ``print_json`` writes the one JSON
document to the real stdout; so ``moekit CMD --json | python -m json.tool`` always parses.

Bad input: a ``UsageError`` raised anywhere in a ``cmd_*`` function (``fail_on_bad_input``)
becomes one line ``moekit CMD: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

EXIT_USAGE = 2  # argparse's status for a bad command line; moekit uses it for every bad input


class UsageError(ValueError):
    """Bad input the user can fix: a flag's value, a missing file, an --out that is taken."""


class MoekitParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``moekit train: error: argument --lr: ...`` and a pointer
    to --help, instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """Keep the hand-wrapped description and epilog; align option help at column 32."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# --------------------------------------------------------------------------------------------
# --json
# --------------------------------------------------------------------------------------------

_json_stream: TextIO | None = None  # the real stdout while json_output is active


@contextlib.contextmanager
def json_output(enabled: bool) -> Iterator[None]:
    """While enabled: ``print`` (and tqdm.write) go to stderr; ``print_json`` to the real stdout."""
    global _json_stream
    if not enabled:
        yield
        return
    previous = _json_stream
    _json_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stream = previous


def print_json(payload: dict[str, Any]) -> None:
    """The --json result: one compact JSON object on one line, flushed, on stdout."""
    stream = _json_stream if _json_stream is not None else sys.stdout
    print(json.dumps(payload, separators=(",", ":")), file=stream, flush=True)


def add_json_flag(parser: argparse.ArgumentParser, document: bool = False) -> None:
    """--json. ``document=True``: stdout holds the JSON document alone (``main`` runs the command
    in ``json_output``); False keeps the older layout, human text then the JSON as the last line."""
    if document:
        parser.set_defaults(json_document=True)
        text = "print the result as one JSON document on stdout (and nothing else there); human text to stderr"
    else:
        text = "also print the figures as one JSON object on the last line"
    parser.add_argument("--json", action="store_true", help=text)


# --------------------------------------------------------------------------------------------
# Errors and flag validation
# --------------------------------------------------------------------------------------------


def fail(command: str, err: Exception | str) -> int:
    """Report bad input as one line on stderr; the exit status 2."""
    print(f"moekit {command}: error: {err}", file=sys.stderr)
    return EXIT_USAGE


def fail_on_bad_input(command: str, *errors: type[BaseException]) -> Callable:
    """Decorate a ``cmd_*`` function: ``UsageError`` and ``errors`` become ``fail(command, err)``."""
    caught = (UsageError, *errors)

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except caught as err:
                return fail(command, err)

        wrapper.__doc__ = run.__doc__
        wrapper.__name__ = run.__name__
        return wrapper

    return decorate


def shown(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check(flag: str, value: Any, ok: bool, allowed: str) -> None:
    """``flag value is invalid: allowed`` unless ``ok``."""
    if not ok:
        raise UsageError(f"{flag} {shown(value)} is invalid: {allowed}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(flag: str, value: float) -> None:
    check(flag, value, is_number(value) and value > 0, "must be a finite number > 0")


def check_non_negative(flag: str, value: float) -> None:
    check(flag, value, is_number(value) and value >= 0, "must be a finite number >= 0")


def check_count(flag: str, value: int, minimum: int = 1) -> None:
    check(flag, value, isinstance(value, int) and value >= minimum, f"must be an integer >= {minimum}")


def check_input_path(flag: str, path: str | Path, kind: str = "file") -> Path:
    """An input that must exist: ``kind`` is "file" or "directory"."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such {kind}")
    if kind == "file" and not path.is_file():
        raise UsageError(f"{flag} {path}: is not a file")
    if kind == "directory" and not path.is_dir():
        raise UsageError(f"{flag} {path}: is not a directory")
    return path


def check_new_out(flag: str, path: str | Path) -> Path:
    """An output directory that is new or empty, checked before any work: nothing is overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{flag} {path}: the directory is not empty; choose a new or empty one (nothing was written)")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def split_list(text: str) -> list[str]:
    """``"1,2 4"`` → ``["1", "2", "4"]``: the items of a comma- or space-separated flag value."""
    return [key.strip() for key in text.replace(" ", ",").split(",") if key.strip()]


def case_list(text: str) -> list[str]:
    keys = split_list(text)
    if not keys:
        raise argparse.ArgumentTypeError("expected case numbers such as 1,3")
    return keys


def print_help(parser: argparse.ArgumentParser) -> int:
    """A command group called without a subcommand: its help, exit status 2."""
    parser.print_help()
    return EXIT_USAGE
