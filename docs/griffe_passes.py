"""Griffe extensions for the docs build (mkdocs.yml, mkdocstrings ``extensions``).

- ``FxlopPasses``: the repository's top-level ``passes/`` folder is installed as ``fxlop.passes``
  (setup.cfg ``package_dir``), which griffe cannot see by reading ``fxlop/``; attach it there so that
  ``::: fxlop.passes.<name>`` resolves from the sources, without importing anything.
- ``SphinxRoles``: the docstrings cross-reference in Sphinx's style (``:func:`expand```), which
  Markdown would show as written; render each role as inline code (``~`` keeps the last name).
"""
import re
from pathlib import Path

import griffe

PASSES = Path(__file__).resolve().parent.parent / "passes"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


class FxlopPasses(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name == "fxlop" and "passes" not in pkg.members:
            pkg.set_member("passes", loader.load(PASSES))


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(
                lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", obj.docstring.value)
