"""The benchmarks reproduce from one command, and the docs' results pages show exactly what their JSON holds."""
import dataclasses
import json
import re

import pytest

import fxlop

from benchmarks import common, mechanism, recovery, retraining, speed, zoo


def _shown(page: str, name: str) -> str:
    """The table ``docs/results/<page>.md`` includes (pymdownx.snippets: ``--8<-- "<name>"``, from
    benchmarks/results/)."""
    text = (common.ROOT / "docs" / "results" / f"{page}.md").read_text()
    assert re.search(rf'^--8<-- "{re.escape(name)}"$', text, re.M), f"docs/results/{page}.md does not include {name}"
    return (common.RESULTS / name).read_text()


def _results(name: str) -> dict:
    return json.loads((common.RESULTS / f"{name}.json").read_text())


def test_docs_recovery_table_is_the_json():
    assert _shown("recovery", "recovery.md") == recovery.grid_markdown(_results("recovery")) + "\n"
    page = (common.ROOT / "docs" / "results" / "recovery.md").read_text()
    for figure in ("recovery.png", "recovery_time.png"):
        assert (common.RESULTS / figure).stat().st_size > 0 and f"figures/{figure})" in page


def test_docs_speed_table_is_the_json():
    assert _shown("speed", "speed.md") == speed.markdown(_results("speed")) + "\n"


def test_docs_retraining_tables_are_the_json():
    assert _shown("recovery", "retraining.md") == retraining.markdown(_results("retraining")) + "\n"


def test_docs_study_and_rounds_tables_are_the_json():
    assert _shown("recovery", "recovery_study.md") == recovery.study_markdown(_results("recovery_study")) + "\n"
    assert _shown("recovery", "recovery_rounds.md") == recovery.rounds_markdown(_results("recovery_rounds")) + "\n"


def test_docs_zoo_summary_is_the_json():
    result = _results("zoo")
    assert _shown("zoo", "zoo_summary.md") == zoo.summary(result["rows"], result["machine"]) + "\n"
    assert _shown("zoo", "zoo.md") == zoo.markdown(result["rows"], result["machine"]) + "\n"


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
    assert [r["setup"]["dataset"] for r in result["results"]] == ["digits", "mnist1d"]
    for data in result["results"]:
        for row in data["rows"]:
            assert set(row["methods"]) == set(row["paper"]) == set(recovery.GRID_DEFAULT)
            assert all(m["lr"] == 0.01 for m in row["paper"].values())
    assert (results_dir / "recovery_quick.png").stat().st_size > 0
    assert (results_dir / "recovery_quick_time.png").stat().st_size > 0
    table = (results_dir / "recovery_quick.md").read_text()
    assert table == recovery.grid_markdown(result) + "\n" and "Paper protocol" in table
    assert json.loads((results_dir / "recovery_quick.json").read_text()) == json.loads(json.dumps(result))


def test_time_table_gives_each_budgets_accuracy_and_wall_time():
    def scores(mean, seconds_per_epoch):
        return {"test": {"mean": mean, "std": 0.0}, "seconds_per_epoch": seconds_per_epoch}
    rows = [{"ratio": 0.8, "epochs": 10, "methods": {"vanilla": scores(90.0, 0.5), "lop": scores(91.0, 1.25)}},
            {"ratio": 0.8, "epochs": 30, "methods": {"vanilla": scores(94.0, 0.5), "lop": scores(93.5, 1.0)}}]
    table = recovery._time_markdown(rows, ["vanilla", "lop"])
    assert table.splitlines()[-1] == "| 0.8 | 90.0 in 5 s → 94.0 in 15 s | 91.0 in 12 s → 93.5 in 30 s |"


def test_fusing_halfway_trains_the_expanded_then_the_fused_model(results_dir):
    setup = recovery.Setup(dataset="mnist1d", model="cnn1d", dense_epochs=1)
    method = recovery.Variant("lop_fuse_half", fxlop.METHODS["lop"], factor_lr_scale=0.5, fuse_at=0.5, lr=0.05)
    run = recovery.run_one((setup, 0.8, method, 0, 4))
    whole = recovery.run_one((setup, 0.8, dataclasses.replace(method, fuse_at=None), 0, 4))
    assert len(run["train_ce"]) == 4 and run["train_ce"][:2] == whole["train_ce"][:2]  # same until the fuse
    assert run["train_ce"][2:] != whole["train_ce"][2:]


def test_mechanism_quick_run(results_dir):
    result = mechanism.main(["--quick", "--datasets", "mnist1d", "--workers", "1"])
    data = result["datasets"][0]
    assert set(data["training"]) == {"vanilla", *(c.name for c in mechanism.CONFIGS)}
    for name, rows in data["layers"].items():
        assert len(rows) == 8  # cnn1d: 7 convs and the classifier
        for row in rows:
            assert 0 < row["gain_min"] <= row["gain_max"] and -1 <= row["cosine"] <= 1
    plain = data["layers"]["t=1, factor lr 1"]
    # orthonormal outer factors, every factor at the base rate: the kernel factor alone gives gain 1
    assert all(abs(r["gains"][1] - 1) < 1e-5 and r["gain_min"] >= 1 - 1e-6 for r in plain)
    assert all(r["beyond_first_order"] < 0.5 for r in plain)
    assert (results_dir / "mechanism_quick.md").read_text() == mechanism.markdown(result) + "\n"


def test_rounds_study_quick_run(results_dir):
    result = recovery.main(["--rounds-study", "--quick", "--workers", "1", "--datasets", "mnist1d"])
    rows = {(r["method"], r["rounds"]): r for r in result["rows"]}
    assert set(rows) == {("vanilla", 1), ("vanilla", 2), ("lop_sp", 1), ("lop_sp", 2)}
    assert len({r["params"] for r in rows.values()}) == 1  # every way ends at the one-shot widths
    assert (results_dir / "recovery_rounds_quick.md").read_text() == recovery.rounds_markdown(result) + "\n"


def test_paired_difference_is_the_mean_with_its_t_interval():
    d = retraining.paired([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])
    half = 4.30265272974946 / 3 ** 0.5  # t(0.975, 2) = 4.30265 (tables), times sd 1 / sqrt(3)
    assert (d["mean"], d["n"]) == (2.0, 3)
    assert d["low"] == pytest.approx(2 - half, rel=1e-12) and d["high"] == pytest.approx(2 + half, rel=1e-12)
    assert retraining._interval(d).startswith("+2.0 [") and not retraining._interval(d).startswith("**")
    assert retraining._interval(retraining.paired([3.0, 3.1, 2.9], [0.0, 0.0, 0.0])).startswith("**+3.0")


def test_retraining_quick_run_pairs_every_method_and_resumes(results_dir, monkeypatch):
    args = ["--quick", "--workers", "1", "--datasets", "mnist1d", "--recipes", "vanilla", "lop", "kd"]
    result = retraining.main(args)
    row = result["results"][0]["rows"][0]
    assert set(row["methods"]) == {"vanilla", "lop", "kd", "vanilla@constant", "lop@constant", "control@constant",
                                   "vanilla@multistep", "lop@multistep", "control@multistep"}
    assert row["methods"]["vanilla"]["to_vanilla"] is None
    assert all(m["to_vanilla"]["n"] == 2 for n, m in row["methods"].items() if n != "vanilla")
    assert all(m["lr"] == 0.01 and m["settings"]["factor_lr_scale"] == 1.0
               for n, m in row["methods"].items() if n.startswith(("vanilla@", "lop@")))
    assert row["control_lr"] == pytest.approx(0.01 * row["median_gain"], rel=1e-3) and row["median_gain"] > 1
    assert row["equal"]["vanilla"]["epochs"] == 2  # --quick: vanilla's budget is 2 epochs
    table = (results_dir / "retraining_quick.md").read_text()
    assert table == retraining.markdown(result) + "\n" and "FT (vanilla at a constant 0.01)" in table
    runs = (results_dir / "retraining_quick_runs.jsonl").read_text().splitlines()
    monkeypatch.setattr(retraining.recovery, "run_one", lambda job: pytest.fail("--resume ran a finished run"))
    again = retraining.main([*args, "--resume"])
    assert again["results"][0]["rows"] == json.loads(json.dumps(result["results"][0]["rows"]))
    assert (results_dir / "retraining_quick_runs.jsonl").read_text().splitlines() == runs


def test_retraining_refuses_reporting_the_sweep_seeds(capsys):
    with pytest.raises(SystemExit):
        retraining.main(["--seeds", "100", "1", "--sweep-seeds", "100"])
    assert "never reported" in capsys.readouterr().err
