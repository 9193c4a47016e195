"""flywheel.cli.user_errors: the CLI's one way of turning a user's mistake into a message."""

from __future__ import annotations

import pytest
import typer

from flywheel.cli import USER_ERROR_EXIT, user_errors
from flywheel.scenario import ScenarioError


def test_an_expected_error_is_one_line_on_stderr_and_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(typer.Exit) as exit_info, user_errors():
        raise FileNotFoundError("no table at days.csv; pass the file flywheel ab wrote")
    assert exit_info.value.exit_code == USER_ERROR_EXIT == 2
    captured = capsys.readouterr()
    assert captured.err == "error: no table at days.csv; pass the file flywheel ab wrote\n"
    assert captured.out == ""


def test_only_the_named_kinds_are_caught_so_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(typer.Exit), user_errors(FileNotFoundError, ScenarioError):
        raise ScenarioError("scenario.traffic.treatment_share must be in (0, 1), got 1.5")
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug, not the user's to fix")
    bug = pytest.raises(ValueError, match="deep in the run")
    with bug, user_errors(FileNotFoundError, ScenarioError):
        raise ValueError("deep in the run")
