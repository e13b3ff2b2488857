"""specdec/rpc/settings.py: a configuration dataclass's flags, environment fallbacks and errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from specdec.rpc import settings
from specdec.rpc.settings import setting


def _peer(text: str) -> str:
    if "=" not in text:
        raise ValueError(f"--peer {text!r}: expected NAME=ADDRESS")
    return text


@dataclass(frozen=True)
class Example:
    target: str = setting(help="where to send", metavar="HOST:PORT")
    peers: tuple[str, ...] = setting((), "a peer (repeatable)", flag="--peer", parse=_peer)
    size: int = setting(4, "how many")
    folder: Path | None = setting(None)
    mode: str = setting("a", choices=("a", "b"))
    fast: bool = setting(True, "1: fast, 0: slow")
    tokens: tuple[str, ...] = setting((), env_only=True, secret=True)
    extra_file: str | None = setting(None, "an extra file", group="extra")

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")


def parse(argv: list[str], env: dict[str, str] | None = None) -> Example:
    env = {} if env is None else env
    return settings.parse_args(Example, settings.build_parser(Example, env, prog="example",
                                                              groups={"extra": "more settings"}), argv, env)


def error_of(capsys, argv: list[str], env: dict[str, str] | None = None) -> str:
    """The one line argparse ends with when it refuses the command line (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, env)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_defaults_come_from_the_dataclass_and_flags_win_over_the_environment():
    assert parse(["--target", "h:1"]) == Example(target="h:1")
    assert parse([], {"SPECDEC_TARGET": "h:2", "SPECDEC_SIZE": "7"}) == Example(target="h:2", size=7)
    config = parse(["--target", "h:1", "--size", "9", "--folder", "/f", "--mode", "b", "--fast", "0",
                    "--extra-file", "x"], {"SPECDEC_SIZE": "7", "SPECDEC_MODE": "a", "SPECDEC_FAST": "1"})
    assert config == Example("h:1", size=9, folder=Path("/f"), mode="b", fast=False, extra_file="x")
    assert parse([], {"SPECDEC_TARGET": "h", "SPECDEC_FOLDER": "/g", "SPECDEC_FAST": "0"}).folder == Path("/g")
    assert parse([], {"SPECDEC_TARGET": "h", "SPECDEC_FAST": "0"}).fast is False


def test_a_tuple_is_a_repeated_flag_or_a_comma_separated_variable():
    env = {"SPECDEC_TARGET": "h", "SPECDEC_PEER": "c=3, d=4,"}
    assert parse(["--peer", "a=1", "--peer", "b=2"], env).peers == ("a=1", "b=2")  # the flags replace the list
    assert parse([], env).peers == ("c=3", "d=4")


def test_a_secret_comes_from_the_environment_only_and_is_counted_never_shown():
    config = parse([], {"SPECDEC_TARGET": "h", "SPECDEC_TOKENS": "s3cr3t, t0k3n"})
    assert config.tokens == ("s3cr3t", "t0k3n")
    for text in (settings.describe(config), repr(config)):
        assert "s3cr3t" not in text and "t0k3n" not in text
    assert "  tokens = <2 from SPECDEC_TOKENS>" in settings.describe(config).splitlines()
    assert "  size = 4" in settings.describe(config).splitlines()
    assert "--tokens" not in settings.build_parser(Example, {}).format_help()


def test_errors_are_one_line_with_exit_status_2(capsys):
    assert error_of(capsys, []) == "example: error: --target HOST:PORT is required (or set SPECDEC_TARGET)"
    assert error_of(capsys, ["--target", "h", "--size", "0"]) == "example: error: --size must be >= 1, got 0"
    assert error_of(capsys, ["--target", "h", "--peer", "x"]) == \
        "example: error: --peer 'x': expected NAME=ADDRESS"
    assert error_of(capsys, ["--target", "h"], {"SPECDEC_PEER": "y"}) == \
        "example: error: --peer 'y': expected NAME=ADDRESS"
    # A variable is converted and refused as the flag would be.
    assert error_of(capsys, ["--target", "h"], {"SPECDEC_SIZE": "x"}) == \
        "example: error: argument --size: invalid int value: 'x'"
    assert error_of(capsys, ["--target", "h", "--mode", "c"]).startswith(
        "example: error: argument --mode: invalid choice: 'c'")
    assert error_of(capsys, ["--target", "h", "--fast", "2"]).startswith(
        "example: error: argument --fast: invalid choice: 2")


def test_help_names_each_flags_variable_and_its_group(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag
    text = " ".join(settings.build_parser(Example, {}, groups={"extra": "more settings"}).format_help().split())
    for note in ("--target HOST:PORT where to send (env SPECDEC_TARGET)",
                 "--peer PEERS a peer (repeatable) (env SPECDEC_PEER, comma-separated)",
                 "--folder FOLDER env SPECDEC_FOLDER", "--fast {0,1} 1: fast, 0: slow (env SPECDEC_FAST)",
                 "extra: more settings --extra-file EXTRA_FILE an extra file (env SPECDEC_EXTRA_FILE)"):
        assert note in text, note
