"""fxlop: linear over-parameterization of pruned networks as torch.fx passes.

``expand`` a pruned model, fine-tune it, ``fuse`` it back to exactly the pruned architecture;
``verify`` checks each step numerically.
"""
from .core import expand, expand_with, fuse, overparameterized, report
from .distill import distiller, kd_loss, similarity_loss
from .errors import EquivalenceError, ExpansionError, FusionError, FxlopError, SelectionError, TraceError
from .methods import METHODS, Method
from .passes import ExpandOptions, Report
from .checkpoint import load_checkpoint
from .optim import param_groups
from .settings import TrainOptions
from .settings import renamed as _renamed
from .train import evaluate, finetune
from .verify import verify

__version__ = "0.1.0"
__all__ = ["expand", "expand_with", "fuse", "overparameterized", "report", "verify", "finetune", "evaluate",
           "ExpandOptions", "Report", "TrainOptions", "Method", "METHODS", "load_checkpoint", "param_groups",
           "similarity_loss", "kd_loss", "distiller", "FxlopError", "TraceError", "ExpansionError", "FusionError",
           "SelectionError", "EquivalenceError", "__version__"]
__getattr__ = _renamed(globals(), {"TrainConfig": "TrainOptions"})  # the old name, with a DeprecationWarning
