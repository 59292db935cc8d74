"""The README's Python example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_recipes_for_pipelines_of_ones_own_are_among_the_examples():
    """Issue 16: the own-loop (param_groups, distiller, a checkpoint resumed) and in-place recipes are
    python blocks, so the test above runs them as written."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert any("fxlop.param_groups(" in b and "fxlop.distiller(" in b and "load_state_dict(checkpoint" in b
               for b in blocks)
    assert any("with fxlop.overparameterized(" in b for b in blocks)
