import json
import os
import subprocess
import sys

import pytest
import torch

import fxlop
import passes
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
    code, out, err = _cli("run", "--epochs", 2, "--dense-epochs", 2, "--ratio", 0.5, "--baseline",
                          "--out", tmp_path / "run", "--json", tmp_path / "final.json", "--quiet")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "final.json").read_text())
    assert report == json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("dense_accuracy", "post_prune_accuracy", "finetuned_accuracy", "params", "macs", "wall_time_s"):
        assert key in report, key
    assert set(report["methods"]) == {"lop_sp", "vanilla"}
    assert report["params"]["fused"] == report["params"]["pruned"] < report["params"]["dense"]
    assert report["macs"]["fused"] == report["macs"]["pruned"] < report["macs"]["dense"]
    lop = report["methods"]["lop_sp"]
    assert lop["verify_max_relative_error"] <= 1e-5 and lop["params_expanded"] > report["params"]["pruned"]
    assert len(lop["history"]) == 2 and (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert "fine-tuned: lop_sp" in out and "fine-tuned: vanilla" in out

    # the saved model is the pruned architecture and reproduces the reported accuracy
    deployed = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert sum(p.numel() for p in deployed.parameters()) == report["params"]["pruned"]
    assert isinstance(deployed, type(build_model("resnet20", num_classes=10, in_channels=1)))
    test = make_loader(load_dataset("digits").test, batch_size=256, shuffle=False)
    assert fxlop.evaluate(deployed, test)["accuracy"] == pytest.approx(report["finetuned_accuracy"], abs=1e-9)


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
def test_bad_input_is_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00\x01 not a checkpoint")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1  # an uncaught exception would fail here
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxlop: error: ") and message in err, err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    code, out, err = _cli("run", "--ratio", "1.5", "--out", tmp_path)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "fxlop: error: --ratio must be in (0, 1), got 1.5"
    code, out, err = _cli("run", "--epochs", "many")
    assert code == 2 and "Traceback" not in err and "invalid int value" in err  # argparse's own usage error
