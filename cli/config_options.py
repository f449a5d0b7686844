"""One ``probe train`` option per ``DQNConfig`` field, with the field's docstring as its help."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import typing
from enum import Enum
from typing import Annotated, Any

import typer
from rich.markup import escape

from reference_agent.config import ConfigError, DQNConfig, describe

OPTION_NAMES = {"env_id": ("--env",), "total_steps": ("--steps", "--total-steps")}
"""Short names the design gives; every other field is ``--field-name``."""

SKIPPED = {"extra"}
LIST_FIELDS = {"hidden_sizes": "64,64", "reg_layers": "net.2"}
"""Tuple fields, given on the command line as comma-separated lists (with an example)."""
PANEL = "Agent configuration (defaults: the paper's settings)"


def flag(field_name: str) -> str:
    """The ``probe train`` option of a config field: ``total_steps`` → ``--steps``."""
    return OPTION_NAMES.get(field_name, ("--" + field_name.replace("_", "-"),))[0]


def help_text(doc: str) -> str:
    """A docstring as option help: RST ``literals`` as plain text, brackets shown, not read as
    rich markup."""
    return escape(doc.replace("``", ""))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a dataclass, from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def config_parameters() -> list[inspect.Parameter]:
    """Keyword parameters ``Annotated[type, typer.Option(...)]`` for the config fields."""
    hints = typing.get_type_hints(DQNConfig)
    docs = field_docs(DQNConfig)
    defaults = DQNConfig()
    params = []
    for f in dataclasses.fields(DQNConfig):
        if f.name in SKIPPED:
            continue
        kind: Any = hints[f.name]
        default = getattr(defaults, f.name)
        text = docs.get(f.name, "")
        if f.name in LIST_FIELDS:
            kind, default = str, ",".join(map(str, default))
            text += f" Comma-separated, e.g. {LIST_FIELDS[f.name]}."
        names = OPTION_NAMES.get(f.name, (flag(f.name),))
        if kind is bool:
            names = (f"{names[0]}/--no-{names[0][2:]}",)
        option = typer.Option(*names, help=help_text(text), rich_help_panel=PANEL)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )
    return params


def config_from_options(values: dict[str, Any]) -> DQNConfig:
    """Build the config from parsed option values (enums to their values, sizes to a tuple);
    invalid settings are reported by their option names."""
    data = {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()}
    sizes = str(data.pop("hidden_sizes"))
    try:
        data["hidden_sizes"] = tuple(int(x) for x in sizes.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--hidden-sizes expects comma-separated integers, got {sizes!r}") from None
    data["reg_layers"] = tuple(x.strip() for x in str(data.pop("reg_layers")).split(",") if x.strip())
    try:
        return DQNConfig.from_dict(data)
    except ConfigError as err:
        raise ValueError(err.message(flag)) from None


def config_warnings(cfg: DQNConfig) -> list[str]:
    """``cfg.warnings()`` in option names."""
    return [describe(f, m, flag) for f, m in cfg.warnings()]
