"""The paper's scripts (scripts/paper/table*.sh) name only tasks the pinned lmms-eval has, and every command
they run parses: lmms-eval's flags, and the star backend's model_args. Nothing is downloaded or loaded."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from star.integrations import LMMS_MISSING

pytest.importorskip("lmms_eval", reason=LMMS_MISSING)

from lmms_eval.utils import simple_parse_args_string  # noqa: E402

from star.integrations.lmms_eval import BACKEND, check_model_args  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "paper"
TABLES = {"table1.sh": 7 * 29, "table2.sh": 4 * 29 * 2}  # tasks x (1 + 7 methods x 4 budgets) runs; table3.sh: test_random_init


def commands(script: str) -> list[list[str]]:
    """The lmms-eval arguments of each command the script would run."""
    printed = subprocess.run(["bash", str(SCRIPTS / script)], env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True).stdout
    runs = [shlex.split(line) for line in printed.splitlines() if line.strip()]
    return [words[words.index("--model"):] for words in runs]


@pytest.fixture(scope="module")
def known_tasks() -> set[str]:
    from lmms_eval.tasks import TaskManager

    return set(TaskManager("ERROR", include_path=str(SCRIPTS / "tasks")).all_tasks)


@pytest.mark.parametrize("script", sorted(TABLES))
def test_every_command_parses_and_names_known_tasks(script, known_tasks, monkeypatch):
    from lmms_eval.__main__ import parse_eval_args

    runs = commands(script)
    tasks_times_runs = 0
    for argv in runs:
        monkeypatch.setattr(sys, "argv", ["lmms-eval", *argv])
        _, args = parse_eval_args()
        assert args.model == BACKEND and args.log_samples and args.output_path
        tasks = args.tasks.split(",")
        assert set(tasks) <= known_tasks, f"{script}: unknown tasks {set(tasks) - known_tasks}"
        tasks_times_runs += len(tasks)
        model_args = simple_parse_args_string(args.model_args)
        assert model_args.pop("pretrained")
        check_model_args(**model_args)
    assert tasks_times_runs == TABLES[script]
    assert len({tuple(a) for a in runs}) == len(runs)
