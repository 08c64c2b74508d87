"""Output folders that appear only when complete.

Every command that writes a model or a run folder writes into a hidden temporary sibling and
renames it into place at the end, so a failed or interrupted command never leaves a folder
that looks finished.
"""

from __future__ import annotations

import json
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_modes(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes a plain mkdir / open would have (0o777 and
    0o666 less the umask). Temporary folders are made 0o700, and safetensors 0.8 writes its
    files 0o600 whatever the umask, so without this a model folder written by one user could not
    be read by another (a server or a teammate loading the adapter)."""
    mask = _umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root, d), 0o777 & ~mask)
        for f in files:
            path = Path(root, f)
            if not path.is_symlink():
                os.chmod(path, 0o666 & ~mask)


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
    share_modes(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, record: dict, indent: int = 2) -> Path:
    """Write `record` as JSON so that `path` holds either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpruceError(f"{what} {path} does not exist; check the path")
    return path
