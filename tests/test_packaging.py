"""What ``pip install .`` puts on a user's path: one top-level name, ``fxlop``, with the passes inside."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # no build isolation: the venv's setuptools builds it, so the test needs nothing from an index
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_a_plain_install_puts_only_fxlop_on_the_path(installed):
    names = {p.name for p in installed.iterdir()}
    assert {n for n in names if not n.endswith(".dist-info") and n != "bin"} == {"fxlop"}, names
    assert (installed / "fxlop" / "passes" / "expand.py").is_file()
    assert not (installed / "passes").exists()


def test_the_installed_passes_import_under_fxlop(installed, tmp_path):
    code = ("import fxlop, fxlop.passes as p; import pathlib; "
            "assert pathlib.Path(p.__file__).parent == pathlib.Path(fxlop.__file__).parent / 'passes', p.__file__; "
            "assert p.expand is not None and fxlop.ExpansionError is p.ExpansionError; "
            "assert issubclass(fxlop.FxlopError, p.PassError) and not hasattr(p, 'FxlopError')")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
