"""The line between the pure passes and the rest of fxlop: errors and names.

The passes never import fxlop, so they raise their own ``PassError`` kinds; fxlop's entry points
re-raise them as the ``FxlopError`` of the same kind.  fxlop and the benchmarks use only public names.
"""
import ast
import importlib
import pathlib
import pickle
import traceback
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxlop
from fxlop import passes
from fxlop.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


class _Branching(nn.Module):
    """Control flow on a tensor's value: symbolic tracing fails inside the passes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def _small():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


ENTRY_POINTS = [
    # (what, call, the passes' kind it raises inside, fxlop's kind it must leave as)
    ("expand, bad option", lambda: fxlop.expand(_small(), depth=1), passes.ExpansionError, fxlop.ExpansionError),
    ("expand, bad pattern", lambda: fxlop.expand(_small(), include=3), passes.SelectionError, fxlop.SelectionError),
    ("expand_with, module swap", lambda: fxlop.expand_with(_small(), passes.ExpandOptions(trace=False, depth=2,
                                                                                          max_layer_params=0,
                                                                                          max_params=1)),
     passes.ExpansionError, fxlop.ExpansionError),
    ("overparameterized, bad option", lambda: fxlop.overparameterized(_small(), mode="eager"),
     passes.ExpansionError, fxlop.ExpansionError),
    ("expand, untraceable", lambda: fxlop.expand(_Branching()), passes.TraceError, fxlop.TraceError),
    ("distiller, untraceable", lambda: fxlop.distiller(_small(), _Branching()), passes.TraceError, fxlop.TraceError),
]


@pytest.mark.filterwarnings("ignore:.*left dense")
@pytest.mark.parametrize("what,call,pass_kind,fxlop_kind", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_pass_errors_leave_fxlop_as_fxlop_errors_of_their_kind(what, call, pass_kind, fxlop_kind):
    with pytest.raises(fxlop_kind) as raised:
        call()
    assert isinstance(raised.value, fxlop.FxlopError) and isinstance(raised.value, pass_kind), type(raised.value)
    # the traceback (or the cause it was re-raised from, with more context) still reaches the passes' line
    error, files = raised.value, []
    while error is not None:
        files += [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
        error = error.__cause__
    assert any("/passes/" in name for name in files), files


def test_the_same_message_and_attributes_cross_the_boundary():
    error = passes.ExpansionError("layer conv1: too wide")
    error.layer = "conv1"
    translated = fxlop.errors.as_fxlop_error(error)
    assert isinstance(translated, fxlop.ExpansionError) and isinstance(translated, fxlop.FxlopError)
    assert translated.args == error.args and type(translated).__name__ == "ExpansionError"
    assert translated.layer == "conv1"
    assert fxlop.errors.as_fxlop_error(translated) is translated
    # errors cross process boundaries too (worker pools, distributed runs)
    unpickled = pickle.loads(pickle.dumps(translated))
    assert type(unpickled) is type(translated) and unpickled.args == error.args and unpickled.layer == "conv1"


def test_the_passes_called_directly_raise_their_own_errors():
    gm = fx.symbolic_trace(_small())
    with pytest.raises(passes.ExpansionError) as raised:
        passes.expand(gm, depth=1)
    assert not isinstance(raised.value, fxlop.FxlopError)
    with pytest.raises(passes.PassError, match="cannot tap"):
        passes.tap(gm, ["nope"])
    with pytest.raises(fxlop.FusionError):  # fxlop's kinds are the passes' own
        fxlop.expand(_small()).get_submodule("0").fuse()
    # and a kind keeps its standard base
    assert issubclass(fxlop.SelectionError, TypeError) and issubclass(passes.SelectionError, TypeError)


def test_a_pass_error_in_the_cli_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(_small(), path)
    code = main(["expand", str(path), str(tmp_path / "e.pt"), "--depth", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("fxlop: error:") and "Traceback" not in err, err
    assert "depth must be an integer >= 2, got 1" in err, err  # the pass's own refusal, not a usage error
    assert not (tmp_path / "e.pt").exists()


def test_an_error_raised_while_handling_another_keeps_that_context():
    def refuse():
        try:
            raise KeyError("conv1")
        except KeyError:
            raise passes.ExpansionError("no such layer")

    with pytest.raises(fxlop.ExpansionError) as raised:
        with fxlop.errors.fxlop_errors():
            refuse()
    assert isinstance(raised.value, fxlop.FxlopError) and isinstance(raised.value.__cause__, KeyError)


def test_an_error_the_caller_is_handling_is_not_made_the_cause():
    try:
        raise ValueError("the caller's own")
    except ValueError:
        with pytest.raises(fxlop.ExpansionError) as raised:
            with fxlop.errors.fxlop_errors():
                raise passes.ExpansionError("refused")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def _warnings_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


@pytest.mark.parametrize("what,call", [
    ("include matching nothing", lambda: fxlop.expand(_small(), include="nothing.*")),
    ("include matching nothing, modules", lambda: fxlop.expand(_small(), include="nothing.*", trace=False)),
    ("layers left dense", lambda: fxlop.expand(_small(), max_layer_params=0)),
    ("taps without a partner", lambda: fxlop.distiller(_small(), nn.Sequential(nn.Conv2d(3, 4, 3)), ["0", "2"])),
    ("a renamed setting", lambda: fxlop.TrainConfig),
])
def test_warnings_point_at_the_callers_line(what, call):
    caught = _warnings_of(call)
    assert caught, what
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno, str(w.message)[:60]) for w in caught]


# --- names --------------------------------------------------------------------------------------

PUBLIC_MODULES = ("fxlop", "fxlop.passes", "fxlop.data", "fxlop.models", "fxlop.prune", "fxlop.verify",
                  "fxlop.optim")


def _imports(path: pathlib.Path, package: str):
    """(module, name) for each ``from module import name`` in ``path``, relative ones resolved in ``package``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            for alias in node.names:
                yield node.lineno, module, alias.name


def _passes_names_used(path: pathlib.Path):
    """Names read as ``passes.<name>`` in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "passes":
            yield node.lineno, node.attr


def _fxlop_files():
    return sorted((ROOT / "fxlop").glob("*.py"))


@pytest.mark.parametrize("path", _fxlop_files(), ids=lambda p: p.name)
def test_fxlop_uses_only_the_public_names_of_the_passes(path):
    public = set(passes.__all__)
    wrong = [f"{path.name}:{line}: from {module} import {name}"
             for line, module, name in _imports(path, "fxlop")
             if module.startswith("fxlop.passes") and (module != "fxlop.passes" or name not in public)]
    wrong += [f"{path.name}:{line}: passes.{name}" for line, name in _passes_names_used(path) if name not in public]
    assert not wrong, wrong


def test_the_passes_never_import_the_rest_of_fxlop():
    wrong = [f"{path.name}:{line}: from {module} import {name}"
             for path in sorted((ROOT / "passes").glob("*.py"))
             for line, module, name in _imports(path, "fxlop.passes")
             if module.startswith("fxlop") and not module.startswith("fxlop.passes")]
    wrong += [f"{path.name}: import fxlop" for path in sorted((ROOT / "passes").glob("*.py"))
              if any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "fxlop" for a in n.names)
                     for n in ast.walk(ast.parse(path.read_text())))]
    assert not wrong, wrong


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_the_benchmarks_import_only_public_api(path):
    wrong = []
    for line, module, name in _imports(path, "benchmarks"):
        if not module.startswith("fxlop"):
            continue
        if module not in PUBLIC_MODULES:
            wrong.append(f"{path.name}:{line}: from {module} (not a public module)")
        elif name not in importlib.import_module(module).__all__ and f"{module}.{name}" not in PUBLIC_MODULES:
            wrong.append(f"{path.name}:{line}: {module}.{name} is not in its __all__")
    wrong += [f"{path.name}:{line}: passes.{name}" for line, name in _passes_names_used(path)
              if name not in passes.__all__]
    assert not wrong, wrong


@pytest.mark.parametrize("module", PUBLIC_MODULES[2:])
def test_each_public_module_exports_what_it_defines(module):
    public = importlib.import_module(module)
    assert public.__all__ and all(hasattr(public, name) for name in public.__all__), module


@pytest.mark.parametrize("module,old,new", [("fxlop", "TrainConfig", "TrainOptions"),
                                            ("fxlop.settings", "TrainConfig", "TrainOptions"),
                                            ("fxlop.train", "TrainConfig", "TrainOptions"),
                                            ("fxlop.pipeline", "RunSettings", "RunOptions")])
def test_renamed_settings_answer_to_their_old_names_with_a_warning(module, old, new):
    public = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is now {module}.{new}"):
        assert getattr(public, old) is getattr(public, new)
    with pytest.raises(AttributeError, match="no attribute 'TrainConfg'"):
        public.TrainConfg
