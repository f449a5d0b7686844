"""User mistakes become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, soft_wrap=True)
DEBUG = {"on": False}
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    KeyError,
    RuntimeError,
    ImportError,
    MemoryError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr (the message verbatim, never read as markup); return
    the ``typer.Exit`` to raise."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (verbatim)."""
    err_console.print(Text.assemble(("warning:", "bold yellow"), " ", message), highlight=False)


def user_errors(func: F) -> F:
    """Turn the exceptions a user can cause into ``error: …`` and exit code 2, and Ctrl-C into
    exit code 130 (``--debug`` re-raises them with the traceback). Deliberate exits
    (``typer.Exit``, ``typer.Abort``) pass through untouched."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):  # RuntimeErrors, but deliberate
            raise
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            err_console.print("interrupted", style="yellow", highlight=False)
            raise typer.Exit(INTERRUPTED) from None
        except USER_ERRORS as err:
            if DEBUG["on"]:
                raise
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise fail(message) from None

    return wrapper  # type: ignore[return-value]
