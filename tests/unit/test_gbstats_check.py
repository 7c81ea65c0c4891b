"""The benchmark's GrowthBook column against gbstats 0.8.0 itself, in its own environment.

gbstats pins numpy<2, so the slow test builds a throwaway virtual environment with it (from
the package index, as the project's own install does) and runs the real comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from analytics.simulate import EFFECTS, HOURS, SCENARIOS
from bot.cli import main as cli_main
from bot.gbstats_check import (
    GbstatsUnavailable,
    agreement,
    gbstats_results,
    simulated_counts,
)


@pytest.fixture(scope="session")
def gbstats_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("gbstats-venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "gbstats==0.8.0"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return python


@pytest.mark.slow
def test_the_growthbook_column_decides_as_gbstats_does(
        gbstats_python: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--check-gbstats", str(gbstats_python), "--runs", "4",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agree"] is True
    assert report["runs"] == len(SCENARIOS) * len(EFFECTS) * 4
    assert report["looks"] == report["runs"] * HOURS
    assert max(report["max_abs_diff"].values()) <= 1e-9
    assert report["flag_disagreements"] == report["decision_disagreements"] == 0


@pytest.mark.slow
def test_the_check_notices_a_different_test(gbstats_python: Path) -> None:
    # gbstats' own answers at another tuning stand for an implementation that drifted.
    counts = simulated_counts(2, seed=1)
    unique, back = np.unique(counts.reshape(-1, 4), axis=0, return_inverse=True)
    drifted = gbstats_results(gbstats_python, unique, tuning=500.0)
    result = agreement(drifted[back.reshape(-1)].reshape(*counts.shape[:2], 3), counts)
    assert not result.ok and result.flag_disagreements > 0
    golden = gbstats_results(gbstats_python, np.array([[1000, 800, 1000, 840]]))
    np.testing.assert_allclose(golden[0], [-0.0136, 0.0936, 0.2587], atol=5e-5)


def test_an_interpreter_without_gbstats_is_named_with_the_fix() -> None:
    with pytest.raises(GbstatsUnavailable, match=r"pip install gbstats==0\.8\.0"):
        gbstats_results(sys.executable, np.array([[10, 8, 10, 9]]))


def test_a_missing_interpreter_is_a_clear_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--check-gbstats", str(tmp_path / "nothing"), "--runs", "1"]) == 2
    assert "cannot run" in capsys.readouterr().err
