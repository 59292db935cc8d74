import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fxlop
from fxlop import passes
from fxlop.cli import main
from fxlop.data import load_dataset, make_loader
from fxlop.models import build_model


def _cli(*args):
    """``python -m fxlop ...`` in a subprocess: exit code, stdout, stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fxlop", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_run_end_to_end_on_digits(tmp_path):
    code, out, err = _cli("run", "--epochs", 2, "--dense-epochs", 2, "--ratio", 0.5,
                          "--out", tmp_path / "run", "--json", tmp_path / "final.json", "--quiet")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "final.json").read_text())
    assert report == json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("dense_accuracy", "post_prune_accuracy", "finetuned_accuracy", "vanilla_accuracy", "params", "macs",
                "wall_time_s", "deployed", "selection"):
        assert key in report, key
    # --method auto: vanilla, SP, LOP+SP and KD+SP fine-tuned with one budget, the best on validation deployed
    assert set(report["methods"]) == {"vanilla", "sp", "lop_sp", "kd_sp"} and report["data"]["val"] == 252
    scores = {m: r["val_accuracy"] for m, r in report["methods"].items()}
    assert scores[report["deployed"]] == max(scores.values())
    assert report["deployed"] != "vanilla" or scores["vanilla"] >= max(scores.values())
    assert report["deployed"] == "vanilla" or scores[report["deployed"]] > scores["vanilla"]  # ties go to vanilla
    assert report["vanilla_accuracy"] == report["methods"]["vanilla"]["accuracy"]
    assert report["params"]["fused"] == report["params"]["pruned"] < report["params"]["dense"]
    assert report["macs"]["fused"] == report["macs"]["pruned"] < report["macs"]["dense"]
    lop = report["methods"]["lop_sp"]
    assert lop["verify_max_relative_error"] <= 1e-5 and lop["params_expanded"] > report["params"]["pruned"]
    assert len(lop["history"]) == 2 and (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert "fine-tuned: lop_sp" in out and "fine-tuned: vanilla" in out and f"{report['deployed']} (deployed)" in out

    # the saved model is the pruned architecture and reproduces the deployed method's reported accuracy
    deployed = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert sum(p.numel() for p in deployed.parameters()) == report["params"]["pruned"]
    assert isinstance(deployed, type(build_model("resnet20", num_classes=10, in_channels=1)))
    test = make_loader(load_dataset("digits").test, batch_size=256, shuffle=False)
    assert fxlop.evaluate(deployed, test)["accuracy"] == pytest.approx(report["finetuned_accuracy"], abs=1e-9)
    assert report["finetuned_accuracy"] == report["methods"][report["deployed"]]["accuracy"]


def test_run_on_mnist1d_with_an_explicit_method(tmp_path):
    code, out, err = _cli("run", "--dataset", "mnist1d", "--method", "lop", "--epochs", 1, "--dense-epochs", 1,
                          "--out", tmp_path, "--quiet")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["model"], report["deployed"], report["selection"].startswith(("as asked", "warning"))) == \
        ("cnn1d", "lop", True)
    assert set(report["methods"]) == {"lop", "vanilla"}  # vanilla always runs beside the method asked for
    assert report["data"] == {"name": "mnist1d", "train": 3200, "test": 1000, "val": 800, "input_shape": [1, 40]}
    deployed = torch.load(tmp_path / "model.pt", weights_only=False)
    assert sum(p.numel() for p in deployed.parameters()) == report["params"]["pruned"] == 4_113


def test_run_with_logit_distillation_and_onecycle(tmp_path):
    code, out, err = _cli("run", "--dataset", "mnist1d", "--method", "kd", "--schedule", "onecycle", "--epochs", 2,
                          "--kd-weight", 0.6, "--kd-temperature", 3, "--dense-epochs", 1, "--out", tmp_path, "--quiet")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == {"kd", "vanilla"} and report["deployed"] == "kd"
    kd, vanilla = report["methods"]["kd"]["history"], report["methods"]["vanilla"]["history"]
    assert all(r["train_kd"] > 0 for r in kd) and all(r["train_kd"] == 0 for r in vanilla)  # only kd distills
    assert (report["settings"]["train"]["kd_weight"], report["settings"]["train"]["schedule"]) == (0.6, "onecycle")
    # onecycle: warmed up to --lr (0.05, the run's default) within the first epoch, annealed by the end
    assert 0.05 / 25 < kd[0]["lr"] <= 0.05 and kd[-1]["lr"] < 0.01 * kd[0]["lr"]
    assert "fine-tuned: kd (deployed)" in out


def test_run_in_rounds_reaches_the_one_shot_widths(tmp_path):
    code, out, err = _cli("run", "--rounds", 2, "--epochs", 3, "--dense-epochs", 1, "--ratio", 0.5, "--method", "lop",
                          "--out", tmp_path, "--quiet")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["epochs"] for r in rounds] == [1, 2]  # the budget, split
    assert rounds[0]["params"] > rounds[1]["params"] == report["params"]["pruned"] == report["params"]["fused"]
    assert rounds[-1]["widths"] == report["widths_pruned"]
    assert report["widths_pruned"]["conv1"] == 8 and report["widths_pruned"]["layer3.0.conv1"] == 32  # floor(C / 2)
    assert all(set(r["methods"]) == {"lop", "vanilla"} for r in rounds)
    assert (tmp_path / "lop.jsonl").exists() and (tmp_path / "lop_round2.jsonl").exists()
    deployed = torch.load(tmp_path / "model.pt", weights_only=False)
    assert sum(p.numel() for p in deployed.parameters()) == report["params"]["pruned"]


def _results(**val_accuracy):
    from fxlop.pipeline import MethodResult

    return {m: MethodResult(accuracy=v, val_accuracy=v, history=[], taps=[], train_time_s=0.0, time_per_epoch_s=0.0,
                            verify_max_relative_error=None, params_expanded=None) for m, v in val_accuracy.items()}


def test_auto_deploys_the_best_on_validation_and_ties_go_to_vanilla():
    from fxlop.pipeline import RunOptions, _choose

    auto = RunOptions(candidates=["vanilla", "lop", "lop_sp"])
    assert _choose(auto, _results(vanilla=0.90, lop=0.93, lop_sp=0.92))[0] == "lop"
    assert _choose(auto, _results(vanilla=0.93, lop=0.93, lop_sp=0.92))[0] == "vanilla"
    assert _choose(auto, _results(lop=0.93, vanilla=0.95, lop_sp=0.92))[0] == "vanilla"
    chosen, why = _choose(RunOptions(method="lop_sp"), _results(lop_sp=0.90, vanilla=0.95))
    assert chosen == "lop_sp" and why.startswith("warning: lop_sp reached 90.00 %") and "vanilla's 95.00 %" in why
    assert _choose(RunOptions(method="lop_sp"), _results(lop_sp=0.96, vanilla=0.95)) == ("lop_sp", "")


@pytest.mark.parametrize("args,message", [
    (["--expansion", "inf"], "expansion must be a finite number >= 1, got inf"),
    (["--depth", "1"], "depth must be an integer >= 2"),
    (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    (["--gamma", "-1"], "gamma must be a finite number >= 0"),
    (["--taps", "nope"], "--taps ['nope'] name no layer of the model"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device 'cuda:"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--model", "resnet20", "--dataset", "mnist1d"], "dataset 'mnist1d' holds 1-D signals; model 'resnet20'"),
    (["--val-fraction", "0"], "--method auto chooses on a validation split"),
    (["--factor-lr-scale", "-2"], "factor_lr_scale must be a finite number >= 0"),
    (["--pointwise-expansion", "0.5"], "pointwise_expansion must be a finite number >= 1 or None, got 0.5"),
])
def test_run_settings_are_checked_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    import fxlop.pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("work was started before the settings were checked")

    monkeypatch.setattr(fxlop.pipeline, "finetune", no_work)
    if args[0] != "--taps":  # taps name layers of the model, which is built for the data: checked after loading it
        monkeypatch.setattr(fxlop.pipeline.datasets, "load_dataset", no_work)
    assert main(["run", "--out", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxlop: error: ") and message in err, err


def test_expand_command_limits(tmp_path, capsys):
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).eval(), tmp_path / "model.pt")
    args = ["expand", str(tmp_path / "model.pt"), str(tmp_path / "out.pt")]
    assert main(args + ["--max-bytes", "1000"]) == 1  # refused before anything large is allocated
    err = capsys.readouterr().err
    assert err.startswith("fxlop: error: ") and "max_bytes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()
    assert main(args + ["--max-layer-params", "2000", "--max-seconds", "none"]) == 0
    layers = [m for m in torch.load(tmp_path / "out.pt", weights_only=False).modules()
              if isinstance(m, passes.ExpandedLayer)]
    sizes = [sum(f.numel() for f in layer.factors) for layer in layers]
    assert layers and max(sizes) <= 2000 < 4 * 9 * 16 * 16 * 4  # a 16-wide 3x3 conv at r=4 would not fit


@pytest.mark.parametrize("flag,fc_width", [([], 64), (["--pointwise-expansion", "3"], 192),
                                            (["--pointwise-expansion", "none"], 128)])
def test_expand_command_pointwise_expansion(tmp_path, flag, fc_width):
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).eval(), tmp_path / "model.pt")
    assert main(["expand", str(tmp_path / "model.pt"), str(tmp_path / "out.pt"), "--expansion", "2", *flag]) == 0
    expanded = torch.load(tmp_path / "out.pt", weights_only=False)
    assert expanded.get_submodule("fc").factors[0].shape == (fc_width, 64)  # the classifier takes 64 features
    assert expanded.get_submodule("conv1").factors[0].shape == (2 * 1, 1, 1, 1)  # 3x3 convs keep --expansion


def test_run_flags_come_from_the_settings_classes(capsys):
    from fxlop import ExpandOptions, TrainOptions
    from fxlop.pipeline import RunOptions

    help_text = " ".join(_cli("run", "--help")[1].split())
    for cls in (RunOptions, TrainOptions, ExpandOptions):
        for field in dataclasses.fields(cls):
            if field.metadata.get("cli", True) and field.name not in ("train", "expand"):
                assert f"--{field.name.replace('_', '-')}" in help_text, field.name
    # choices come from the settings: argparse's check, reported as one error line with exit code 1
    assert main(["run", "--importance", "magnitude"]) == 1
    err = capsys.readouterr().err
    assert "invalid choice: 'magnitude'" in err and len(err.strip().splitlines()) == 1


def test_every_keyword_of_expand_is_an_option_and_a_flag_of_both_commands():
    import inspect

    fields = {f.name: f.default for f in dataclasses.fields(fxlop.ExpandOptions)}
    signature = inspect.signature(fxlop.expand).parameters
    keywords = {n: p.default for n, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == fields  # the signature the docs show is the options model, defaults included
    in_place = {n: p.default for n, p in inspect.signature(fxlop.overparameterized).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert in_place == {n: d for n, d in fields.items() if n not in ("leaf_modules", "trace")}  # a module swap
    for command in ("expand", "run"):
        help_text = " ".join(_cli(command, "--help")[1].split())
        for name in keywords:
            assert f"--{name.replace('_', '-')}" in help_text, (command, name)


def test_expand_command_takes_every_option(tmp_path, capsys):
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).eval(), tmp_path / "model.pt")
    args = ["expand", str(tmp_path / "model.pt"), str(tmp_path / "out.pt"), "--init", "balanced", "--exclude", "fc",
            "--include", "conv1", "fc", "--no-trace", "--max-params", "none", "--seed", "3"]
    assert main(args) == 0
    expanded = torch.load(tmp_path / "out.pt", weights_only=False)
    report = fxlop.report(expanded).expand
    assert not isinstance(expanded, torch.fx.GraphModule) and not report.traced  # --no-trace: a module swap
    assert [r.name for r in report.expanded] == ["conv1"] and report.skipped_reasons["fc"] == "matched by exclude"
    assert (report.options.init, report.options.seed, report.options.include) == ("balanced", 3, ("conv1", "fc"))
    assert main(["expand", str(tmp_path / "model.pt"), str(tmp_path / "x.pt"), "--init", "sideways"]) == 1
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_run_settings_from_flags(monkeypatch):
    import fxlop.pipeline

    seen = {}
    monkeypatch.setattr(fxlop.pipeline, "run", lambda settings, **kwargs: seen.setdefault("settings", settings))
    assert main(["run", "--lr", "0.2", "--mode", "chain", "--rounds", "3", "--taps", "conv1", "fc", "--bf16"]) == 0
    settings = seen["settings"]
    assert (settings.train.lr, settings.train.taps, settings.train.bf16, settings.rounds) == (0.2, ["conv1", "fc"],
                                                                                                True, 3)
    assert settings.expand.mode == "chain" and settings.train.gamma == 0.3 and settings.train.sp_weighting == "relative"
    assert settings.train.epochs == 10 and settings.expand.expansion == 4  # the run's defaults where no flag is given


def test_fuse_command_on_plain_and_eagerly_expanded_models(tmp_path, capsys):
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    torch.save(model, tmp_path / "plain.pt")
    assert main(["fuse", str(tmp_path / "plain.pt"), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxlop: error: ") and "holds no expanded layer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()
    torch.save(fxlop.expand(model, trace=False), tmp_path / "eager.pt")
    assert main(["fuse", str(tmp_path / "eager.pt"), str(tmp_path / "fused.pt")]) == 0
    assert "fused 22 layers" in capsys.readouterr().out
    fused = torch.load(tmp_path / "fused.pt", weights_only=False)
    assert fused.state_dict().keys() == model.state_dict().keys()
    fxlop.verify(model, fused, torch.randn(2, 1, 16, 16))


def test_verify_command_on_models_without_parameters(tmp_path, capsys):
    torch.save(torch.nn.ReLU(), tmp_path / "a.pt")
    torch.save(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "b.pt")
    assert main(["verify", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--input-shape", "3,4"]) == 0
    assert "equivalent" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--input-shape", "3,-4"]) == 1
    assert "non-negative sizes" in capsys.readouterr().err


def test_expand_fuse_verify_commands(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    torch.save(model, tmp_path / "model.pt")
    assert main(["expand", str(tmp_path / "model.pt"), str(tmp_path / "expanded.pt"), "--expansion", "2"]) == 0
    expanded = torch.load(tmp_path / "expanded.pt", weights_only=False)
    assert sum(isinstance(m, passes.ExpandedLayer) for m in expanded.modules()) == 22  # 21 convs + fc
    assert sum(p.numel() for p in expanded.parameters()) > 3 * sum(p.numel() for p in model.parameters())
    assert main(["fuse", str(tmp_path / "expanded.pt"), str(tmp_path / "fused.pt")]) == 0
    assert main(["verify", str(tmp_path / "model.pt"), str(tmp_path / "fused.pt"), "--input-shape", "2,1,16,16"]) == 0
    assert main(["fuse", str(tmp_path / "expanded.pt"), str(tmp_path / "folded.pt"), "--fold-bn"]) == 0
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    other = build_model("resnet20", num_classes=10, in_channels=1)
    torch.save(other, tmp_path / "other.pt")
    assert main(["verify", str(tmp_path / "model.pt"), str(tmp_path / "other.pt"), "--input-shape", "2,1,16,16"]) == 1


@pytest.mark.parametrize("args,message", [
    (["run", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["run", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["run", "--dataset", "cifar10", "--data-dir", "{tmp}"], "CIFAR-10 not found in"),
    (["run", "--ratio", "1.5"], "--ratio must be in (0, 1)"),
    (["run", "--ratio", "0"], "--ratio must be in (0, 1)"),
    (["run", "--weights", "{tmp}/corrupt.pt"], "corrupt.pt is unreadable"),
    (["fuse", "{tmp}/corrupt.pt", "{tmp}/out.pt"], "corrupt.pt is unreadable"),
    (["verify", "{tmp}/missing.pt", "{tmp}/missing.pt", "--input-shape", "1,2"], "does not exist"),
    (["verify", "{tmp}/corrupt.pt", "{tmp}/corrupt.pt", "--input-shape", "a,b"], "comma-separated integers"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/latest) is a fresh one
    (tmp_path / "corrupt.pt").write_bytes(b"\x00\x01 not a checkpoint")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1  # an uncaught exception would fail here
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxlop: error: ") and message in err, err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    code, out, err = _cli("run", "--ratio", "1.5", "--out", tmp_path)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "fxlop: error: --ratio must be in (0, 1), got 1.5"
    code, out, err = _cli("run", "--epochs", "many")
    assert code == 1 and "Traceback" not in err and "invalid int value" in err  # argparse's check, one line
    assert err.startswith("fxlop: error: fxlop run: argument --epochs") and len(err.strip().splitlines()) == 1
