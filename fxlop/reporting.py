"""What a run leaves for people to read: a terminal table, report.json and a PNG of the curves."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_write, write_text
from .passes import as_dict


def table(rows: Sequence[Sequence], headers: Sequence[str], markdown: bool = False) -> str:
    """A fixed-width text table (or a GitHub markdown table) of already formatted cells."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def write_json(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as JSON through :func:`fxlop.io.atomic_write`.

    A reader never sees half a report, and a failed write leaves the previous file.

    Args:
        path: the file to write.
        payload: JSON data; dataclasses (reports) through :func:`fxlop.passes.as_dict`, tensors and arrays
            (anything with ``tolist``) and paths are converted.

    Raises:
        TypeError: ``payload`` holds something JSON cannot hold (before the file is touched).
        OSError: the write failed; ``path`` is untouched.
    """
    text = json.dumps(payload, indent=2, default=_jsonable) + "\n"  # serialized before the file is touched
    write_text(path, text)


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # reports: the one conversion
        return as_dict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot_curves(path: str | os.PathLike, histories: dict[str, list[dict]], *, dense_accuracy: float | None = None,
                post_prune_accuracy: float | None = None, title: str = "") -> None:
    """Plot accuracy and training loss per epoch, one line per method, dense and post-prune levels dashed.

    Args:
        path: the PNG to write (atomically).
        histories: per method, its per-epoch records (``epoch``, ``train_ce``, accuracies).
        dense_accuracy: the dense model's accuracy, drawn as a dashed level.
        post_prune_accuracy: the pruned model's accuracy before fine-tuning, dashed too.
        title: the figure's title.

    Raises:
        OSError: the write failed; ``path`` is untouched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method, history in histories.items():
        epochs = [r["epoch"] for r in history]
        key = "val_accuracy" if history and "val_accuracy" in history[0] else None
        if key:
            accuracy_axis.plot(epochs, [100 * r[key] for r in history], marker="o", label=method)
        loss_axis.plot(epochs, [r["train_ce"] for r in history], marker="o", label=method)
    if dense_accuracy is not None:
        accuracy_axis.axhline(100 * dense_accuracy, color="gray", linestyle="--", label="dense")
    if post_prune_accuracy is not None:
        accuracy_axis.axhline(100 * post_prune_accuracy, color="gray", linestyle=":", label="after pruning")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="held-out accuracy")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        with atomic_write(path) as handle:
            figure.savefig(handle, format="png", dpi=110)
    finally:
        plt.close(figure)
