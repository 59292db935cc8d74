"""Worker of tests/test_resume.py, run in processes of its own: a training loop of a user's own on an
expanded model, with fxlop.param_groups, that writes a checkpoint (model and optimizer state_dicts)
after three steps.

    python resume_worker.py first DIR   # 6 steps, checkpoint after 3, and the weights after 6
    python resume_worker.py resume DIR  # a fresh expansion, the checkpoint loaded, steps 4 to 6

DIR holds ``pruned.pt`` (a whole pruned model, torch.save'd).  Every variant expands the pruned model
with the same options in both processes: by its graph, without tracing, or in place.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fxlop

OPTIONS = dict(expansion=2, seed=3)
#: (how the model is expanded, which optimizer)
VARIANTS = [("graph", "sgd"), ("eager", "adamw"), ("inplace", "sgd")]


def batch(step):
    """The data of one step, the same in every process."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator)


def expanded(way, pruned):
    """The expanded model, and the block to exit for the in-place way."""
    if way == "graph":
        return fxlop.expand(pruned, **OPTIONS), None
    if way == "eager":
        return fxlop.expand(pruned, trace=False, **OPTIONS), None
    block = fxlop.overparameterized(pruned, **OPTIONS)
    return block.__enter__(), block


def optimizer(kind, model):
    groups = fxlop.param_groups(model, lr=0.05, weight_decay=5e-4, factor_lr_scale=0.5)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=0.01)


def train(model, opt, start, stop):
    model.train()
    for step in range(start, stop):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(phase, directory):
    for way, kind in VARIANTS:
        pruned = torch.load(directory / "pruned.pt", weights_only=False)
        model, block = expanded(way, pruned)
        opt = optimizer(kind, model)
        name = f"{way}-{kind}"
        if phase == "first":
            train(model, opt, 0, 3)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, directory / f"{name}.ckpt")
            train(model, opt, 3, 6)
            torch.save(model.state_dict(), directory / f"{name}.uninterrupted")
        else:
            fresh = {key: value.clone() for key, value in model.state_dict().items()}
            checkpoint = torch.load(directory / f"{name}.ckpt")
            # the control: the model's state alone, with a new optimizer
            model.load_state_dict(checkpoint["model"])
            train(model, optimizer(kind, model), 3, 6)
            without_optimizer = {key: value.clone() for key, value in model.state_dict().items()}
            model.load_state_dict(checkpoint["model"])  # strict: the same names and shapes
            opt.load_state_dict(checkpoint["optimizer"])
            train(model, opt, 3, 6)
            torch.save({"fresh": fresh, "without_optimizer": without_optimizer, "continued": model.state_dict()},
                       directory / f"{name}.resumed")
        if block is not None:
            block.__exit__(None, None, None)


if __name__ == "__main__":
    torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)  # the global RNG plays no part
    main(sys.argv[1], Path(sys.argv[2]))
