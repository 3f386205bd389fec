"""Every subcommand's --help explains itself and ends with examples, and each example parses as written."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from star.cli import build_parser, main

[SUBCOMMANDS] = [action.choices for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
NAMES = [name for name in SUBCOMMANDS if name != "lmms-eval"]  # lmms-eval's --help is lmms-eval's own


@pytest.mark.parametrize("name", NAMES)
def test_help_ends_with_examples_that_parse(name, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # the examples name the bundled images by their path in the checkout
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert SUBCOMMANDS[name].description and SUBCOMMANDS[name].description.split(".")[0] in " ".join(out.split())
    examples = out.split("\nexamples:\n")[1].splitlines()
    assert examples
    for example in examples:
        words = shlex.split(example, comments=True)
        assert Path(words[0]).name == "star" and words[1] == name, example
        args, unknown = build_parser().parse_known_args(words[1:])  # a bad value exits here, naming the argument
        assert args.command == name and (not unknown or hasattr(args, "passed_on")), example


def test_python_m_star_cli_is_the_star_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "star.cli", "flops", "--keep", "58"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| star | 58 | 576 / 490 / 58 |" in done.stdout
