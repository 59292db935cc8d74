"""The one progress bar of the passes: weighted by estimated seconds, on a terminal only, and only
once a pass has taken two seconds (so short passes print nothing)."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm


def progress(items: Sequence, desc: str, seconds: Sequence[float], names: Sequence[str]):
    """Iterate over ``items`` with a progress bar weighted by their estimated ``seconds``, showing each
    one's name; on a terminal, and only once the pass has taken two seconds."""
    total = sum(seconds)
    with tqdm(total=total, desc=f"{desc} (est. {total:.0f} s)", unit="s", delay=2.0, leave=False, disable=None,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]") as bar:
        for item, weight, name in zip(items, seconds, names):
            bar.set_postfix_str(name, refresh=False)
            yield item
            bar.update(weight)
