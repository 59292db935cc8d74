import os

import pytest
import torch
import torch.nn as nn
from hypothesis import settings

# CI runs a few hundred property examples; the `slow` profile holds the long run.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("slow", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# torch.compile's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: a kernel compiled under avx2 and
# loaded under `default` fails to build (at::vec undeclared).  Runs under another kernel set keep their own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")

#: fp32 end-to-end tolerance of expand/fuse (issue 2): rounding of the factors and of the extra
#: contractions, tens of fp32 units of roundoff relative to the output scale
FP32_RTOL = 1e-5
#: in float64 the same computations agree to roundoff of ~1e-16 times depth and width
FP64_RTOL = 1e-10


class FunctionalLayer(nn.Module):
    """A conv/linear called through the functional API on parameters of the module."""

    def __init__(self, function, weight, bias=None, **options):
        super().__init__()
        self.function = function
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.options = options

    def forward(self, x):
        return self.function(x, self.weight, self.bias, **self.options)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_MEASURED: dict[str, float] = {}


@pytest.fixture
def measured():
    """Record a measured error under a name; the largest per name is printed at the end of the run."""
    def record(name: str, value: float) -> float:
        _MEASURED[name] = max(_MEASURED.get(name, 0.0), float(value))
        return value
    return record


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.write_sep("-", "largest measured relative errors")
        for name, value in sorted(_MEASURED.items()):
            terminalreporter.write_line(f"{name:40s} {value:.3e}")
