"""Progress bars: tqdm, turned off by the caller or by the TQDM_DISABLE environment variable.

tqdm reads TQDM_DISABLE only for arguments the caller leaves out, and spruce always says whether
a bar shows, so the variable is honoured here.

When stderr is not a terminal (a log file, a batch job, a pipe) a redrawn bar would fill the log
with carriage returns and cut the lines printed between its redraws; there the bar writes a
plain line of its own, at most every LINE_SECONDS and once at the end.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

LINE_SECONDS = 20.0


def env_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _WholeLines:
    """A stream that passes on text only as whole lines: the carriage returns and blank padding
    tqdm writes to redraw or clear a bar are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class LineBar(plain_tqdm):
    """A tqdm bar for logs: one plain line every LINE_SECONDS at most, and the last state."""

    def __init__(self, *args, **kwargs):
        self._last_line = 0.0
        kwargs.setdefault("file", _WholeLines(sys.stderr))
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # a request to clear the bar: nothing to clear on a log
            return True
        finished = self.total is not None and self.n >= self.total
        now = time.time()
        if not finished and now - self._last_line < LINE_SECONDS:
            return True
        if finished and getattr(self, "_printed_end", False):
            return True
        self._last_line, self._printed_end = now, finished
        self.fp.write(msg if msg is not None else self.__str__())
        self.fp.flush()
        return True


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one), hidden when `show` is False or TQDM_DISABLE is set;
    plain lines instead of a redrawn bar when stderr is not a terminal (and not a notebook)."""
    disable = not show or env_disabled()
    in_notebook = tqdm.__module__.startswith("tqdm.notebook") or tqdm.__name__ == "tqdm_notebook"
    if not disable and not in_notebook and "file" not in kwargs and not _on_terminal(sys.stderr):
        return LineBar(iterable, disable=False, **kwargs)
    return tqdm(iterable, disable=disable, **kwargs)
