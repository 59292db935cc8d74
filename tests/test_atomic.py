"""Outputs are written atomically and checked before any work (issue 26, cases 3-6 and the CLI messages).

A write that fails part-way (a monkeypatched writer, or a full tmpfs where the machine allows mounting
one) leaves the input and every earlier output as they were; ``fxlop run`` works in a staging
directory that replaces ``--out`` only once the run is complete.
"""
import contextlib
import errno
import json
import os
import shutil
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
    fxlop.io.write_text(tmp_path / "made.txt", "new")
    assert (tmp_path / "made.txt").read_text() == "new"
    assert _mode(tmp_path / "made.txt") == _mode(_plain_file(tmp_path))


def _mode(path):
    return oct(os.stat(path).st_mode & 0o7777)


def _plain_directory(directory):
    """A directory made by a plain mkdir, for the mode a new directory gets here."""
    path = directory / "plain"
    path.mkdir()
    return path


def _plain_file(directory):
    """A file made by a plain open(), for the mode a new file gets here."""
    path = directory / f"plain-{uuid.uuid4().hex[:8]}"
    with open(path, "w"):
        pass
    return path


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    import fxlop.io

    target = tmp_path / "secret.pt"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    fxlop.io.save({"a": 1}, target)
    assert _mode(target) == oct(0o600) and torch.load(target) == {"a": 1}


def test_atomic_write_through_a_symlink_keeps_the_link(tmp_path):
    import fxlop.io

    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    real.write_text("old")
    link.symlink_to(real)
    fxlop.io.write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new" and link.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


class _FillingHandle:
    """A file handle whose writes find the disk full after ``room`` bytes."""

    def __init__(self, handle, room=200):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_save_turns_torchs_runtime_error_into_the_oserror(tmp_path, monkeypatch):
    import fxlop.io

    real = fxlop.io.atomic_write

    @contextlib.contextmanager
    def filling(path, mode="wb"):
        with real(path, mode) as handle:
            yield _FillingHandle(handle)

    monkeypatch.setattr(fxlop.io, "atomic_write", filling)
    with pytest.raises(OSError, match="No space left on device") as caught:
        fxlop.io.save({"weight": torch.zeros(1000)}, tmp_path / "model.pt")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # no temporary file left, no torn model


@pytest.mark.parametrize("command", ["expand", "fuse"])
def test_cli_refuses_an_output_that_is_the_input(tmp_path, capsys, command):
    model = tmp_path / "a.pt"
    torch.save(fxlop.expand(_small()) if command == "fuse" else _small(), model)
    before = model.read_bytes()
    assert main([command, str(model), str(model)]) == 1
    _one_error_line(capsys, "is the input")
    assert main([command, str(model), os.path.join(str(tmp_path), ".", "a.pt")]) == 1  # another spelling
    _one_error_line(capsys, "is the input")
    (tmp_path / "link.pt").symlink_to(model)
    assert main([command, str(model), str(tmp_path / "link.pt")]) == 1  # the same file through a link
    _one_error_line(capsys, "is the input")
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


def _no_permission(monkeypatch, directory):
    """Files cannot be created in ``directory`` (the writability probe included), as if it were read-only."""
    import tempfile

    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(directory):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


_LINUX = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="/proc is Linux's")


def test_cli_unwritable_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    torch.save(_small(), tmp_path / "a.pt")
    monkeypatch.setattr(fxlop.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking the output"))
    with monkeypatch.context() as patch:
        _no_permission(patch, tmp_path)
        assert main(["expand", str(tmp_path / "a.pt"), str(tmp_path / "out.pt")]) == 1
    _one_error_line(capsys, f"output {tmp_path / 'out.pt'} cannot be written: Permission denied")
    if os.path.isdir("/proc/self"):  # a virtual file system too, on Linux
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
    """Nothing is trained: the checks that need the data (a --weights model run on its inputs) may load it."""
    import fxlop.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was trained before the input was checked")

    monkeypatch.setattr(fxlop.pipeline, "finetune", refuse)


@pytest.fixture
def no_data(monkeypatch, no_work):
    """Not even the data are loaded: the checks of paths, settings and the --weights file come first."""
    import fxlop.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the data were loaded before the input was checked")

    monkeypatch.setattr(fxlop.pipeline.datasets, "load_dataset", refuse)


@pytest.mark.parametrize("flags,needle", [
    pytest.param(["--out", "/proc/fxlop-test/run"], "--out /proc/fxlop-test/run cannot be written", marks=_LINUX),
    pytest.param(["--json", "/proc/fxlop-test.json"], "--json /proc/fxlop-test.json cannot be written",
                 marks=_LINUX),
    (["--device", "meta"], "the meta device holds no data"),
])
def test_run_outputs_and_device_are_checked_before_any_work(tmp_path, capsys, no_data, flags, needle):
    assert main([*RUN, "--out", str(tmp_path / "run"), *flags]) == 1
    _one_error_line(capsys, needle)


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_run_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch, no_data, flag):
    (tmp_path / "locked").mkdir()
    _no_permission(monkeypatch, tmp_path / "locked")
    path = str(tmp_path / "locked" / ("run" if flag == "--out" else "report.json"))
    flags = ["--out", path] if flag == "--out" else ["--out", str(tmp_path / "run"), "--json", path]
    assert main([*RUN, *flags]) == 1
    _one_error_line(capsys, f"{flag} {path} cannot be written: Permission denied")


@pytest.mark.parametrize("out", [".", "/", "..", ""])
def test_run_refuses_an_out_it_cannot_replace_before_any_work(tmp_path, capsys, monkeypatch, no_data, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    assert main([*RUN, "--out", out]) == 1
    _one_error_line(capsys, "--out", {".": "current directory", "..": "current directory or one of its parents",
                                      "/": "file system root", "": "--out is empty"}[out])
    assert (tmp_path / "mine.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_run_refuses_an_out_holding_a_users_own_run_files(tmp_path, capsys, no_data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.pt").write_bytes(b"my own model")
    (out / "train.jsonl").write_text("{}\n")
    assert main([*RUN, "--out", str(out)]) == 1
    _one_error_line(capsys, "holds files a run does not write (model.pt, train.jsonl)", ".fxlop-run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"model.pt": b"my own model", "train.jsonl": b"{}\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_failed_run_leaves_an_incomplete_directory_that_is_not_a_runs_alone(tmp_path, monkeypatch):
    import fxlop.pipeline

    def interrupted(method, *args):
        args[-1].write_text('{"epoch": 1}\n')
        raise KeyboardInterrupt

    (tmp_path / "run.incomplete").mkdir()
    (tmp_path / "run.incomplete" / "model.pt").write_bytes(b"mine")
    monkeypatch.setattr(fxlop.pipeline, "_finetune_method", interrupted)
    with pytest.warns(UserWarning, match="left in .*staging-.*run.incomplete exists and is not a run's"), \
            pytest.raises(KeyboardInterrupt):
        fxlop.pipeline.run(fxlop.pipeline.RunOptions(
            dataset="digits", model="resnet20", method="vanilla", dense_epochs=0, batch_size=256,
            out=str(tmp_path / "run"), train=fxlop.TrainOptions(epochs=1)), progress=False, echo=lambda *a: None)
    assert [p.name for p in (tmp_path / "run.incomplete").iterdir()] == ["model.pt"]
    assert (tmp_path / "run.incomplete" / "model.pt").read_bytes() == b"mine"
    staging = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert len(staging) == 1 and (staging[0] / "vanilla.jsonl").exists()


def test_run_refuses_weights_inside_the_incomplete_directory(tmp_path, capsys, no_data):
    from fxlop.models import build_model

    incomplete = tmp_path / "run.incomplete"
    incomplete.mkdir()
    (incomplete / ".fxlop-run").write_text("")
    weights = _save_weights(incomplete, build_model("resnet20", num_classes=10, in_channels=1))
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", weights]) == 1
    _one_error_line(capsys, "is inside", "run.incomplete")


def test_run_refuses_an_out_directory_holding_other_files(tmp_path, capsys, no_data):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*RUN, "--out", str(tmp_path)]) == 1
    _one_error_line(capsys, "holds files a run does not write (notes.txt)")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _earlier_run(out):
    out.mkdir()
    files = {".fxlop-run": b"", "model.pt": b"seed 1 model", "report.json": b'{"seed": 1}', "curves.png": b"png",
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
    assert sorted(p.name for p in out.iterdir()) == [".fxlop-run", "curves.png", "model.pt", "report.json",
                                                     "vanilla.jsonl"]
    assert _mode(out) == _mode(_plain_directory(tmp_path))  # not mkdtemp's 0700
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seed"] == 2 and report["model_path"] == str(out / "model.pt")
    assert not incomplete.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run"]


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
def test_run_checks_whole_module_weights_before_any_work(tmp_path, capsys, monkeypatch, no_work, case, needle):
    import fxlop.pipeline
    from fxlop.models import build_model

    if case in ("another architecture", "expanded", "expanded without tracing"):  # checked before the data
        monkeypatch.setattr(fxlop.pipeline.datasets, "load_dataset",
                            lambda *a, **k: pytest.fail("the data were loaded before the --weights file was checked"))

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


def test_run_refuses_to_replace_its_own_input(tmp_path, capsys, no_data):
    from fxlop.models import build_model

    out = tmp_path / "run"
    out.mkdir()
    (out / ".fxlop-run").write_text("")  # a run's directory, which a run would replace
    weights = _save_weights(out, build_model("resnet20", num_classes=10, in_channels=1), "model.pt")
    before = (out / "model.pt").read_bytes()
    assert main([*RUN, "--out", str(out), "--weights", weights]) == 1
    _one_error_line(capsys, "is inside --out", "which the run replaces")
    assert main([*RUN, "--out", str(tmp_path / "other"), "--weights", weights, "--json", weights]) == 1
    _one_error_line(capsys, "is the --weights file")
    assert (out / "model.pt").read_bytes() == before


def test_run_weights_that_is_a_directory(tmp_path, capsys, no_data):
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", str(tmp_path)]) == 1
    _one_error_line(capsys, "--weights", "is a directory")


def test_a_run_that_fails_before_writing_leaves_nothing(tmp_path, capsys, no_data):
    from fxlop.models import build_model

    weights = _save_weights(tmp_path, build_model("vgg16", num_classes=10, in_channels=1))
    assert main([*RUN, "--out", str(tmp_path / "run"), "--weights", weights]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]  # no staging, no .incomplete


@contextlib.contextmanager
def _small_tmpfs(tmp_path, size="256k"):
    """A tmpfs of ``size`` at a fresh mount point, or skip where mounting is not allowed (not root)."""
    point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if mounted.returncode != 0:
        reason = mounted.stderr.strip() or f"exit status {mounted.returncode}"
        pytest.skip(f"cannot mount a tmpfs here (euid {os.geteuid()}): {reason}")
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


def test_a_failing_cleanup_does_not_hide_the_interrupt(tmp_path, monkeypatch):
    import fxlop.pipeline

    def interrupted(method, *args):
        args[-1].write_text('{"epoch": 1}\n')
        raise KeyboardInterrupt

    def busy(*args, **kwargs):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(fxlop.pipeline, "_finetune_method", interrupted)
    monkeypatch.setattr(fxlop.pipeline.os, "replace", busy)
    with pytest.warns(UserWarning, match="left in .*staging-"), pytest.raises(KeyboardInterrupt):
        fxlop.pipeline.run(fxlop.pipeline.RunOptions(
            dataset="digits", model="resnet20", method="vanilla", dense_epochs=0, batch_size=256,
            out=str(tmp_path / "run"), train=fxlop.TrainOptions(epochs=1)), progress=False, echo=lambda *a: None)
    staging = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert len(staging) == 1 and (staging[0] / "vanilla.jsonl").exists()


def test_json_is_written_and_saved_printed_only_after_the_replace(tmp_path, monkeypatch):
    import fxlop.pipeline

    def failing(staging, final):
        raise fxlop.FxlopError(f"the results could not be put at {final}: they are in {staging}")

    lines = []
    monkeypatch.setattr(fxlop.pipeline, "_replace_directory", failing)
    settings = fxlop.pipeline.RunOptions(dataset="digits", model="resnet20", method="vanilla", dense_epochs=0,
                                          batch_size=256, out=str(tmp_path / "run"), json=str(tmp_path / "r.json"),
                                          train=fxlop.TrainOptions(epochs=1))
    with pytest.raises(fxlop.FxlopError, match="they are in"):
        fxlop.pipeline.run(settings, progress=False, echo=lines.append)
    assert not (tmp_path / "r.json").exists() and not any("saved" in str(line) for line in lines)
    monkeypatch.undo()
    shutil.rmtree(next(p for p in tmp_path.iterdir() if ".staging-" in p.name))
    fxlop.pipeline.run(settings, progress=False, echo=lines.append)
    assert json.loads((tmp_path / "r.json").read_text())["model_path"] == str(tmp_path / "run" / "model.pt")
    assert "saved" in lines[-1]


def test_a_failing_replace_says_where_the_results_are(tmp_path, monkeypatch):
    import fxlop.pipeline

    staging, final = tmp_path / ".run.staging-x", tmp_path / "run"
    staging.mkdir()
    (staging / ".fxlop-run").write_text("")
    monkeypatch.setattr(fxlop.pipeline.os, "replace",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EBUSY, "Device or resource busy")))
    with pytest.raises(fxlop.FxlopError, match=f"could not be put at {final} .*Device or resource busy.*{staging}"):
        fxlop.pipeline._replace_directory(staging, final)
    assert staging.is_dir()


def test_a_folder_that_became_a_users_during_the_run_is_not_replaced(tmp_path):
    import fxlop.pipeline

    staging, final = tmp_path / ".run.staging-x", tmp_path / "run"
    staging.mkdir()
    final.mkdir()
    (final / "model.pt").write_bytes(b"mine")
    with pytest.raises(fxlop.FxlopError, match="changed during the run.*results are in"):
        fxlop.pipeline._replace_directory(staging, final)
    assert (final / "model.pt").read_bytes() == b"mine" and staging.is_dir()


def test_weights_of_a_model_that_cannot_be_built_on_meta(tmp_path, monkeypatch):
    import fxlop.pipeline
    from fxlop.models import build_model

    # torchvision's RegNets copy tensors in their constructor, which the meta device refuses
    assert fxlop.pipeline._reference("regnet_x_400mf")[0].__name__ == "RegNet"
    torch.save(build_model("resnet20", num_classes=10, in_channels=3), tmp_path / "w.pt")
    settings = fxlop.pipeline.RunOptions(dataset="digits", model="regnet_x_400mf", weights=str(tmp_path / "w.pt"))
    with pytest.raises(fxlop.FxlopError, match="holds a CifarResNet, not a regnet_x_400mf"):
        fxlop.pipeline._check_weights_module(torch.load(tmp_path / "w.pt", weights_only=False), settings)
