"""The command registry: every command users call is registered and its module has a parser; the
checkout-only commands say where they run when the package has no clone around it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from elbert_stream import cli

USER_COMMANDS = {"classify", "run", "produce", "consume", "train", "evaluate", "gears", "broker", "bench",
                 "demo"}


def test_every_command_users_call_is_registered_and_parses() -> None:
    assert set(cli.COMMANDS) == USER_COMMANDS
    for command in USER_COMMANDS:
        parser = cli.build_parser(command)
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0


def test_checkout_commands_outside_a_checkout_say_where_they_run(monkeypatch, tmp_path) -> None:
    real = importlib.import_module

    def without_checkout(name: str, *args: object) -> object:
        if name.split(".")[0] in ("bench", "examples"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(cli, "CHECKOUT_ROOT", tmp_path)  # a wheel install: no bench/ beside the package
    monkeypatch.setattr(cli.importlib, "import_module", without_checkout)
    for command, hint in (("demo", "make demo"), ("bench", "make bench")):
        with pytest.raises(SystemExit) as done:
            cli.main([command])
        assert "source checkout" in str(done.value) and hint in str(done.value)


def test_bench_runs_from_the_checkout_whatever_the_working_directory(tmp_path) -> None:
    """``elbert-stream bench`` finds bench/ beside the editable install, not via the current directory."""
    done = subprocess.run([sys.executable, "-m", "elbert_stream.cli", "bench", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "engine" in done.stdout and "stream" in done.stdout


def test_a_bad_setting_is_refused_with_one_line_naming_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ELBERT_ENGINE__MAX_SLOTS", "0")
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("elbert-stream run: ValidationError") and "max_slots" in err
    assert "Traceback" not in err
