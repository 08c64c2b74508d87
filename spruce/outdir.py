"""Output folders that appear only when complete.

Every command that writes a model or a run folder writes into a hidden temporary sibling and
renames it into place at the end, so a failed or interrupted command never leaves a folder
that looks finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import SpruceError


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite_output_dir") -> Path:
    """Refuse an existing, non-empty output folder unless overwriting was asked for."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpruceError(f"output path {path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SpruceError(f"output folder {path} exists and is not empty; pass {flag} "
                          "or choose another folder")
    return path


@contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder that replaces `final` when the block ends without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpruceError(f"{what} {path} does not exist; check the path")
    return path
