"""Griffe extension for the docs build: the repository's top-level ``passes/`` folder is installed as
``fxlop.passes`` (setup.cfg ``package_dir``), which griffe cannot see by reading ``fxlop/``; attach it
there so that ``::: fxlop.passes.<name>`` resolves from the sources, without importing anything."""
from pathlib import Path

import griffe

PASSES = Path(__file__).resolve().parent.parent / "passes"


class FxlopPasses(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name == "fxlop" and "passes" not in pkg.members:
            pkg.set_member("passes", loader.load(PASSES))
