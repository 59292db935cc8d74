"""The benchmarks reproduce from one command, and the README shows exactly what their JSON holds."""
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import recovery  # noqa: E402
import speed  # noqa: E402
import zoo  # noqa: E402


def _readme_block(name: str) -> str:
    text = (common.ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def _results(name: str) -> dict:
    return json.loads((common.RESULTS / f"{name}.json").read_text())


def test_readme_recovery_table_is_the_json():
    table = recovery.grid_markdown(_results("recovery"))
    assert _readme_block("recovery") == table + "\n\n![recovery](benchmarks/results/recovery.png)\n"
    assert (common.RESULTS / "recovery.png").stat().st_size > 0


def test_readme_speed_table_is_the_json():
    assert _readme_block("speed") == speed.markdown(_results("speed")) + "\n"


def test_readme_zoo_summary_is_the_json():
    result = _results("zoo")
    assert _readme_block("zoo") == zoo.summary(result["rows"], result["machine"]) + "\n"


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Benchmark runs in tests write here, not over the committed results."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_speed_quick_run(results_dir):
    result = speed.main(["--quick"])
    assert json.loads((results_dir / "speed_quick.json").read_text())["training"]
    for row in result["training"]:
        assert row["params"]["online"] == row["params"]["chain"] > row["params"]["compact"]
    for row in result["deployment"]:
        assert row["params_fused"] == row["params_pruned"] and row["macs_fused"] == row["macs_pruned"]
    for row in result["passes"]:
        assert row["params_expanded"] > row["params"]


def test_recovery_quick_run(results_dir):
    result = recovery.main(["--quick", "--workers", "1"])
    assert (results_dir / "recovery_quick.png").stat().st_size > 0
    table = (results_dir / "recovery_quick.md").read_text()
    assert table == recovery.grid_markdown(result) + "\n"
    assert json.loads((results_dir / "recovery_quick.json").read_text()) == json.loads(json.dumps(result))
