"""Rich progress bars and logging for the command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal (logs, CI), rich would wrap tables at 80 columns; 120 keeps them whole.
console = Console(width=None if sys.stdout.isatty() else 120)
error_console = Console(stderr=True, soft_wrap=True)


def setup_logging(verbose: bool) -> None:
    """Route library logs through rich; quiet the chatty third-party loggers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    for name in ("transformers", "httpx", "huggingface_hub", "matplotlib", "h5py"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


@contextmanager
def stage(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar for one stage; yields `advance(completed, total=None, note="")`."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, note="")

        def advance(completed: int, total: int | None = None, note: str = "") -> None:
            progress.update(
                task,
                completed=completed,
                note=note,
                **({"total": total} if total is not None else {}),
            )

        yield advance
