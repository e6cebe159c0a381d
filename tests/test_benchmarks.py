"""The `make bench` harness: every benchmark is in it, and a broken one is reported, not hidden."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_is_in_the_harness(run_all):
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")} - {"run_all"}
    assert scripts == {name for name, _, _ in run_all.BENCHMARKS} | set(run_all.MANUAL)
    assert not {name for name, _, _ in run_all.BENCHMARKS} & set(run_all.MANUAL)


def test_a_crashing_benchmark_is_a_failed_row_and_exit_1(run_all, tmp_path, monkeypatch, capsys):
    (tmp_path / "good.py").write_text(
        "import json\nprint('noise')\nprint(json.dumps({'name': 'good', 'summary': "
        "{'mlpipe': '1 s', 'baseline': '2 s', 'ratio': 0.5, 'target': '<= 1', 'met': True}}))\n"
    )
    (tmp_path / "broken.py").write_text("raise SystemExit('boom')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", [("good", [], 60), ("broken", [], 60)])
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", str(tmp_path / "out")])

    assert run_all.main() == 1

    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    good, broken = (json.loads(line) for line in lines)
    assert good["summary"]["ratio"] == 0.5 and "error" not in good
    assert "exit 1" in broken["error"]
    assert "boom" in (tmp_path / "out" / "broken.log").read_text()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| good | 1 s | 2 s | 0.5 | <= 1 | yes |" in summary
    assert "| broken | FAILED" in summary


def test_a_missed_target_fails_only_with_strict(run_all, tmp_path, monkeypatch):
    (tmp_path / "slow.py").write_text(
        "import json\nprint(json.dumps({'name': 'slow', 'summary': {'mlpipe': '3 s', "
        "'baseline': '1 s', 'ratio': 3.0, 'target': '<= 1.1', 'met': False}}))\n"
    )
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", [("slow", [], 60)])
    out = str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", out])
    assert run_all.main() == 0
    assert "| slow | 3 s | 1 s | 3.0 | <= 1.1 | NO |" in Path(out, "summary.md").read_text()
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", out, "--strict"])
    assert run_all.main() == 1
