"""fxlop: linear over-parameterization of pruned networks as torch.fx passes.

``expand`` a pruned model, fine-tune it, ``fuse`` it back to exactly the pruned architecture;
``verify`` checks each step numerically.
"""
from .core import expand, fuse, overparameterized, report
from .distill import distiller, kd_loss, similarity_loss
from .errors import EquivalenceError, ExpansionError, FusionError, FxlopError, SelectionError, TraceError
from .train import TrainConfig, evaluate, finetune, load_checkpoint, param_groups
from .verify import verify

__version__ = "0.1.0"
__all__ = ["expand", "fuse", "overparameterized", "report", "verify", "finetune", "evaluate", "TrainConfig",
           "load_checkpoint", "param_groups", "similarity_loss", "kd_loss", "distiller", "FxlopError", "TraceError", "ExpansionError", "FusionError",
           "SelectionError", "EquivalenceError", "__version__"]
