"""Progress bars: tqdm, turned off by the caller or by the TQDM_DISABLE environment variable.

tqdm reads TQDM_DISABLE only for arguments the caller leaves out, and spruce always says whether
a bar shows, so the variable is honoured here.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def env_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one), hidden when `show` is False or TQDM_DISABLE is set."""
    return tqdm(iterable, disable=not show or env_disabled(), **kwargs)
