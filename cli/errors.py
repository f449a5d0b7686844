"""User mistakes become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, soft_wrap=True)
DEBUG = {"on": False}

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    KeyError,
    RuntimeError,
    ImportError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; return the ``typer.Exit`` to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn the exceptions a user can cause into ``error: …`` and exit code 2 (``--debug``
    re-raises them with the traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            if DEBUG["on"]:
                raise
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise fail(message.replace("[", r"\[")) from None

    return wrapper  # type: ignore[return-value]
