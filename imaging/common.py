"""What every command shares and nothing else needs: the user-error type, the argument parser, atomic writes.

Standard library only, so that any module (``model.py`` included) may import it without pulling in readers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn


class InputError(Exception):
    """A user's mistake (bad file, bad argument): reported as one line, exit code 2."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: ``None`` means "decided from the data or checkpoint", said in
    the option's own help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with documented defaults shown; a bad argument raises ``InputError`` (one line, exit 2)."""

    def __init__(self, description: str | None) -> None:
        super().__init__(description=description, formatter_class=DefaultsHelpFormatter)

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message}")


def run_command(work: Callable[[], object]) -> int:
    """A command's ``main``: log lines to stderr, then ``work()``: exit code 0, or 2 with one ``error:`` line for a
    user's mistake (``InputError``), never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        work()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def region_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """``--regions`` item ``NAME=V,V,…`` (BraTS whole tumour: ``WT=1,2,3,4``) → (name, label values)."""
    name, _, values = text.partition("=")
    try:
        labels = tuple(int(v) for v in values.split(",") if v)
    except ValueError:
        labels = ()
    if not name or not labels or min(labels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=V,V,… with foreground label values")
    return name, labels


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is moved into place: hidden, same folder, same suffix."""
    return path.with_name(f".partial-{path.name}")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds, and never lingers."""
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically, one line per innermost list (shapes, affine rows, boxes) so that it stays readable."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", " ", m.group(0)), text)
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n")
