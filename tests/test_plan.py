"""``flywheel plan``: a twin pilot on a tiny random Llama, planned for both designs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_scenario_toml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.pilot import pilot_scenario, read_pilot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return tiny_scenario_toml(
        tmp_path_factory.mktemp("plan") / "tiny.toml",
        user_model=tiny_llama_dir,
        name="tiny_plan",
        traffic={"n_users": 40, "slot_minutes": None, "max_sessions_per_day": 1},
    )


def test_a_loop_scenario_pilots_its_deployed_policy() -> None:
    scenario, control = pilot_scenario(REPO / "scenarios" / "quickstart.toml")
    assert control == "smollm2" and scenario.traffic.n_users == 120
    assert scenario.world.characters_dir.is_absolute()


def test_plan_runs_a_twin_pilot_and_prices_both_designs(
    tmp_path: Path, scenario: Path, tiny_llama_dir: Path
) -> None:
    model = str(tiny_llama_dir)
    out = tmp_path / "pilot"
    done = CliRunner().invoke(
        app,
        ["plan", str(scenario), "--mde", "0.2", "--control", model,
         "--treatment", f"violate@0.5:{model}", "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output[-3000:]
    rows = {
        (line.split()[0], line.split()[1]): line.split()
        for line in done.output.splitlines()
        if line.split()[:1] in (["breadth"], ["depth"]) and len(line.split()) >= 8
    }
    assert {design for _, design in rows} == {"standard", "twins"}
    pilot = read_pilot(out)
    assert pilot.seconds_per_token > 0 and pilot.tokens_per_user_day > 0
    # Users are counted per design: a twin user lives both arms, so fewer are needed.
    for metric in ("breadth", "depth"):
        twins = int(rows[(metric, "twins")][2].replace(",", ""))
        standard = int(rows[(metric, "standard")][2].replace(",", ""))
        assert 0 < twins < standard
    assert "the scenario's standard test (40 users x 2 test days)" in done.output


def test_plan_refuses_a_pilot_without_traffic(tmp_path: Path, scenario: Path) -> None:
    done = CliRunner().invoke(app, ["plan", str(scenario), "--pilot", str(tmp_path / "none")])
    assert done.exit_code == 2
    assert "no committed days" in done.output or "does not exist" in done.output
