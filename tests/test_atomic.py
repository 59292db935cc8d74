"""Outputs are written atomically and checked before any work (issue 26, cases 3-6 and the CLI messages).

A write that fails part-way (a monkeypatched writer, or a full tmpfs where the machine allows mounting
one) leaves the input and every earlier output as they were; ``fxlop run`` works in a staging
directory that replaces ``--out`` only once the run is complete.
"""
import contextlib
import errno
import json
import os
import subprocess
import uuid

import pytest
import torch
import torch.nn as nn

import fxlop
from fxlop.cli import main


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))


def _torn_save(obj, handle):
    """torch.save that writes part of the file, then finds the disk full."""
    handle.write(b"\x00" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxlop: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_atomic_write_failing_part_way_leaves_the_target(tmp_path):
    import fxlop.io

    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space"):
        with fxlop.io.atomic_write(target) as handle:
            _torn_save(None, handle)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temporary left behind
    fxlop.io.write_text(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("command", ["expand", "fuse"])
def test_cli_refuses_an_output_that_is_the_input(tmp_path, capsys, command):
    model = tmp_path / "a.pt"
    torch.save(fxlop.expand(_small()) if command == "fuse" else _small(), model)
    before = model.read_bytes()
    assert main([command, str(model), str(model)]) == 1
    _one_error_line(capsys, "is the input")
    assert main([command, str(model), str(tmp_path / "." / "a.pt")]) == 1  # the same file by another name
    assert model.read_bytes() == before


@pytest.mark.parametrize("command", ["expand", "fuse"])
def test_cli_write_failing_part_way_keeps_input_and_earlier_output(tmp_path, capsys, monkeypatch, command):
    source, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(fxlop.expand(_small()) if command == "fuse" else _small(), source)
    out.write_bytes(b"earlier output")
    before = source.read_bytes()
    monkeypatch.setattr(torch, "save", _torn_save)
    assert main([command, str(source), str(out)]) == 1
    _one_error_line(capsys, "No space left on device")
    assert source.read_bytes() == before and out.read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "out.pt"]


def test_cli_unwritable_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    torch.save(_small(), tmp_path / "a.pt")
    monkeypatch.setattr(fxlop.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking the output"))
    assert main(["expand", str(tmp_path / "a.pt"), "/proc/fxlop-test/out.pt"]) == 1
    _one_error_line(capsys, "output /proc/fxlop-test/out.pt cannot be written")
    assert main(["expand", str(tmp_path / "a.pt"), str(tmp_path)]) == 1
    _one_error_line(capsys, "is a directory")


def test_cli_directory_as_input(tmp_path, capsys):
    assert main(["expand", str(tmp_path), str(tmp_path / "out.pt")]) == 1
    _one_error_line(capsys, "is a directory, not a file")


@pytest.mark.parametrize("argv,needle", [
    (["expand"], "the following arguments are required: input, output"),
    (["run", "--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "the following arguments are required: command"),
])
def test_argparse_errors_are_one_line_and_exit_1(capsys, argv, needle):
    assert main(argv) == 1
    _one_error_line(capsys, needle)


@pytest.mark.parametrize("shape,needle", [
    ("100000,100000,100", "holds 1,000,000,000,000 elements"),
    ("0,3", "positive sizes"),
    ("2,0,3", "positive sizes"),
])
def test_verify_input_shape_is_bounded_before_allocating(tmp_path, capsys, shape, needle):
    torch.save(nn.ReLU(), tmp_path / "a.pt")
    assert main(["verify", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--input-shape", shape]) == 1
    _one_error_line(capsys, needle)


# --- fxlop run ---------------------------------------------------------------------------------------------------

RUN = ["run", "--dataset", "digits", "--model", "resnet20", "--method", "vanilla", "--epochs", "1",
       "--dense-epochs", "0", "--batch-size", "256", "--quiet"]


@pytest.fixture
def no_work(monkeypatch):
    import fxlop.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was trained before the input was checked")

    monkeypatch.setattr(fxlop.pipeline, "finetune", refuse)


@pytest.mark.parametrize("flags,needle", [
    (["--out", "/proc/fxlop-test/run"], "--out /proc/fxlop-test/run cannot be written"),
    (["--json", "/proc/fxlop-test.json"], "--json /proc/fxlop-test.json cannot be written"),
    (["--device", "meta"], "the meta device holds no data"),
])
def test_run_outputs_and_device_are_checked_before_any_work(tmp_path, capsys, no_work, flags, needle):
    assert main([*RUN, "--out", str(tmp_path / "run"), *flags]) == 1
    _one_error_line(capsys, needle)


def test_run_refuses_an_out_directory_holding_other_files(tmp_path, capsys, no_work):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*RUN, "--out", str(tmp_path)]) == 1
    _one_error_line(capsys, "holds files a run does not write (notes.txt)")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _earlier_run(out):
    out.mkdir()
    files = {"model.pt": b"seed 1 model", "report.json": b'{"seed": 1}', "curves.png": b"png",
             "vanilla.jsonl": b"{}\n", "sp.jsonl": b"{}\n"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def test_an_interrupted_run_leaves_the_earlier_run_whole(tmp_path, capsys, monkeypatch):
    import fxlop.pipeline

    out = tmp_path / "run"
    earlier = _earlier_run(out)
    real = fxlop.pipeline._finetune_method

    def interrupted(method, *args):
        log_path = args[-1]
        log_path.write_text('{"epoch": 1}\n')  # what a run has written by the time it is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(fxlop.pipeline, "_finetune_method", interrupted)
    assert main([*RUN, "--out", str(out), "--seed", "2"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # nothing of seed 2 mixed in
    incomplete = tmp_path / "run.incomplete"
    assert (incomplete / "vanilla.jsonl").read_text() == '{"epoch": 1}\n'  # clearly marked, apart
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]

    # a model.pt write that fails part-way (disk full) after all the training: the earlier run stays too
    monkeypatch.setattr(fxlop.pipeline, "_finetune_method", real)
    monkeypatch.setattr(torch, "save", _torn_save)
    capsys.readouterr()
    assert main([*RUN, "--out", str(out), "--seed", "2"]) == 1
    _one_error_line(capsys, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert not (incomplete / "model.pt").exists() and (incomplete / "vanilla.jsonl").exists()

    # complete: the new run replaces the old directory as a whole (seed 1's sp.jsonl does not linger)
    monkeypatch.undo()
    assert main([*RUN, "--out", str(out), "--seed", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "model.pt", "report.json", "vanilla.jsonl"]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seed"] == 2 and report["model_path"] == str(out / "model.pt")
    assert not incomplete.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _save_weights(tmp_path, model, name="weights.pt"):
    torch.save(model, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("case,needle", [
    ("another architecture", "holds a CifarVGG, not a resnet20 (CifarResNet): pass the --model it is"),
    ("expanded", "holds an expanded model"),
    ("expanded without tracing", "holds an expanded model"),
    ("wrong input channels", "does not take digits's inputs of shape (1, 16, 16)"),
    ("wrong classes", "gives outputs of shape (2, 5) for digits, which has 10 classes"),
])
def test_run_checks_whole_module_weights_before_any_work(tmp_path, capsys, no_work, case, needle):
    from fxlop.models import build_model

    model = {
        "another architecture": lambda: build_model("vgg16", num_classes=10, in_channels=1),
        "expanded": lambda: fxlop.expand(build_model("resnet20", num_classes=10, in_channels=1)),
        "expanded without tracing": lambda: fxlop.expand(build_model("resnet20", num_classes=10, in_channels=1),
                                                         trace=False),
        "wrong input channels": lambda: build_model("resnet20", num_classes=10, in_channels=3),
        "wrong classes": lambda: build_model("resnet20", num_classes=5, in_channels=1),
    }[case]()
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", _save_weights(tmp_path, model)]) == 1
    _one_error_line(capsys, needle)


def test_run_refuses_to_replace_its_own_input(tmp_path, capsys, no_work):
    from fxlop.models import build_model

    out = tmp_path / "run"
    out.mkdir()
    weights = _save_weights(out, build_model("resnet20", num_classes=10, in_channels=1), "model.pt")
    before = (out / "model.pt").read_bytes()
    assert main([*RUN, "--out", str(out), "--weights", weights]) == 1
    _one_error_line(capsys, "is inside --out", "which the run replaces")
    assert main([*RUN, "--out", str(tmp_path / "other"), "--weights", weights, "--json", weights]) == 1
    _one_error_line(capsys, "is the --weights file")
    assert (out / "model.pt").read_bytes() == before


def test_run_weights_that_is_a_directory(tmp_path, capsys, no_work):
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", str(tmp_path)]) == 1
    _one_error_line(capsys, "--weights", "is a directory")


def test_a_run_that_fails_before_writing_leaves_nothing(tmp_path, capsys, no_work):
    from fxlop.models import build_model

    weights = _save_weights(tmp_path, build_model("vgg16", num_classes=10, in_channels=1))
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", weights]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]  # no staging, no .incomplete


@contextlib.contextmanager
def _small_tmpfs(tmp_path, size="256k"):
    """A tmpfs of ``size`` at a fresh mount point, or skip where mounting is not allowed (not root)."""
    point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_full_disk_keeps_the_input_and_the_earlier_output(tmp_path, capsys):
    with _small_tmpfs(tmp_path) as disk:
        source, out = disk / "model.pt", disk / "out.pt"
        torch.save(_small(), source)
        out.write_bytes(b"earlier output")
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\x00" * max(0, free - 16 * 1024))  # the disk full but for a few KB
        before = source.read_bytes()
        assert main(["expand", str(source), str(out), "--expansion", "64", "--max-layer-params", "none"]) == 1
        _one_error_line(capsys, "No space left on device")
        assert source.read_bytes() == before and out.read_bytes() == b"earlier output"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "model.pt", "out.pt"]
