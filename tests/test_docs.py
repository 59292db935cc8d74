"""The documentation runs as written, and the API reference names every public name.

Every fenced code block of README.md and of the pages under docs/ whose info string is ``python``
runs (each page's blocks in order, in one namespace, in a temporary directory). A block that is not
meant to run says so by its info string (``pycon``, ``text``, ``bash``, ...); a fence without one is
refused, so that no block's status is left implicit (docs/contributing.md)."""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """``(info string, first line number, code)`` of every fenced block of a markdown file."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            fence, info, start = match.group(1), match.group(2).strip(), i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith(fence):
                i += 1
            found.append((info.split()[0] if info else "", start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return found


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", [p for p in PAGES if any(info == "python" for info, _, _ in blocks(p))], ids=_name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for info, line, code in blocks(path):
        if info == "python":
            # padded so that a traceback's line numbers are the page's
            exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_every_block_says_whether_it_runs(path):
    bare = [line for info, line, _ in blocks(path) if not info]
    assert not bare, f"{_name(path)}: fenced blocks without an info string at lines {bare} (python runs; pycon/text do not)"


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    info, _, code = blocks(README)[0]
    run, tests = code.splitlines()
    assert info == "bash" and run.endswith("&& fxlop run")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the README's test command is not the one .ci/run runs"
    generated = [line for line in text.splitlines() if line.startswith("<!--") and "--8<--" not in line]
    assert not generated, "README.md holds a generated block; tables go to docs/results"


def test_recipes_for_pipelines_of_ones_own_are_among_the_examples():
    """Issue 16: the own-loop (param_groups, distiller, a checkpoint resumed) and in-place recipes are
    python blocks, so the test above runs them as written."""
    code = [c for p in PAGES for info, _, c in blocks(p) if info == "python"]
    assert any("fxlop.param_groups(" in c and "fxlop.distiller(" in c and "load_state_dict(checkpoint" in c
               for c in code)
    assert any("with fxlop.overparameterized(" in c for c in code)


def _documented() -> dict[str, str]:
    """Public name -> the identifier its ``::: identifier`` directive renders, over the reference pages
    (the name is the directive's ``heading:`` option where it has one)."""
    names = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^::: (\S+)\n((?:[ \t]+.*\n)*)", text, re.M):
            heading = re.search(r"^\s+heading:\s*[\"']?([^\"'\n]+)", match.group(2), re.M)
            names[heading.group(1).strip() if heading else match.group(1)] = match.group(1)
    return names


def _resolve(identifier: str):
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(identifier)


@pytest.mark.parametrize("module", ["fxlop", "fxlop.passes"])
def test_api_reference_names_every_public_name(module):
    public = importlib.import_module(module)
    documented = _documented()
    missing = [f"{module}.{n}" for n in public.__all__ if f"{module}.{n}" not in documented]
    assert not missing, f"not in docs/reference/*.md: {missing}"
    for name in public.__all__:  # and the directive renders that very object
        assert _resolve(documented[f"{module}.{name}"]) is getattr(public, name), name
