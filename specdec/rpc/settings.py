"""A service's configuration as one typed dataclass, its command line generated from the fields.

Each field made with `setting()` carries its default, help and flag once. The flag is --<field-name> (dashes
for underscores) unless `flag=` says otherwise, and it falls back to the environment variable
SPECDEC_<FLAG_NAME>: a flag given wins over the variable, the variable over the default. A tuple field is a
repeatable flag whose variable holds a comma-separated list; a bool field is a flag taking 0 or 1. The
dataclass validates itself in __post_init__, raising a one-line ValueError that names the flag; the command
line reports it as argparse reports its own errors (usage, one line, exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

ENV_PREFIX = "SPECDEC_"

Config = TypeVar("Config")


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
            metavar: str | None = None, choices: Sequence[Any] | None = None,
            parse: Callable[[str], Any] | None = None, group: str | None = None, env_only: bool = False,
            secret: bool = False) -> Any:
    """A dataclass field that is also a flag and an environment variable (no default: the setting is required).

    parse: turns one text value (of a tuple: one item) into the field's type, raising a ValueError whose
    message is shown as it is; group: the argparse group the flag is listed under; env_only: no flag, only
    the variable; secret: left out of repr() and counted, never shown, by describe().
    """
    option = dict(help=help, flag=flag, metavar=metavar, choices=choices, parse=parse, group=group,
                  env_only=env_only, secret=secret)
    return dataclasses.field(default=default, repr=not secret, metadata={"setting": option})


@dataclasses.dataclass(frozen=True)
class _Option:
    """One setting as the command line sees it."""

    name: str  # the field's
    flag: str  # --max-k
    env: str  # SPECDEC_MAX_K
    kind: type  # of the value, or of each item of a tuple; None and the tuple taken off
    many: bool  # a tuple: repeatable flag, comma-separated variable
    required: bool
    help: str | None
    metavar: str | None
    choices: Sequence[Any] | None
    parse: Callable[[str], Any] | None
    group: str | None
    env_only: bool
    secret: bool


def _options(cls: type) -> list[_Option]:
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        meta = dict(field.metadata["setting"])
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        many = typing.get_origin(kind) is tuple
        kind = typing.get_args(kind)[0] if many else kind
        flag = meta.pop("flag") or "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + flag[2:].replace("-", "_").upper()
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        options.append(_Option(field.name, flag, env, kind, many, required, **meta))
    return options


def build_parser(cls: type, env: Mapping[str, str] | None = None, **parser_args: Any) -> argparse.ArgumentParser:
    """The argparse parser of `cls`'s settings with the values of `env` (default os.environ) as defaults.

    parser_args go to ArgumentParser, except `groups`: {group name: description} of the groups settings name.
    """
    env = os.environ if env is None else env
    groups = parser_args.pop("groups", {})
    parser = argparse.ArgumentParser(**parser_args)
    groups = {name: parser.add_argument_group(name, text) for name, text in groups.items()}
    for option in _options(cls):
        if option.env_only:
            continue
        note = f"env {option.env}" + (", comma-separated" if option.many else "")
        kwargs: dict[str, Any] = dict(
            dest=option.name, metavar=option.metavar, choices=(0, 1) if option.kind is bool else option.choices,
            help=f"{option.help} ({note})" if option.help else note,
            # Absent from the result when neither flag nor variable is given: the dataclass default applies.
            default=argparse.SUPPRESS)
        if option.parse is None:
            kwargs["type"] = int if option.kind is bool else option.kind
        if option.many:
            kwargs["action"] = "append"  # argparse would append to a list default: the variable is read later
        elif option.env in env:
            kwargs["default"] = env[option.env]  # argparse converts (and refuses) a text default as a flag value
        groups.get(option.group, parser).add_argument(option.flag, **kwargs)
    return parser


def parse_args(cls: type[Config], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               env: Mapping[str, str] | None = None) -> Config:
    """Flags (`argv`, default sys.argv), else `env`'s SPECDEC_* variables, else defaults -> a validated `cls`;
    a bad value exits with parser.error (status 2). `parser`: build_parser's for `cls` and the same `env`."""
    env = os.environ if env is None else env
    given = vars(parser.parse_args(argv))
    values = {}
    try:
        for option in _options(cls):
            value = given.get(option.name)
            if option.many and value is None and option.env in env:
                value = [item.strip() for item in env[option.env].split(",") if item.strip()]
            if option.required and not value:
                parser.error(f"{option.flag} {option.metavar or option.name.upper()} is required (or set {option.env})")
            if value is None:
                continue  # the dataclass default
            if option.parse is not None:
                value = [option.parse(item) for item in value] if option.many else option.parse(value)
            if option.many:
                value = tuple(value)
            elif option.kind is bool:
                value = bool(value)  # argparse read 0 or 1
            values[option.name] = value
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def describe(config: Any) -> str:
    """One `  name = value` line per setting, for the start-up log; a secret setting only counted."""
    lines = []
    for option in _options(type(config)):
        value = getattr(config, option.name)
        shown = f"<{len(value)} from {option.env}>" if option.secret else value
        lines.append(f"  {option.name} = {shown}")
    return "\n".join(lines)
