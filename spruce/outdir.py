"""Output folders that appear only when complete.

Every command that writes a model or a run folder writes into a hidden temporary sibling and
renames it into place at the end, so a failed or interrupted command never leaves a folder
that looks finished.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import SpruceError


_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite_output_dir") -> Path:
    """Refuse an existing, non-empty output folder unless overwriting was asked for. A folder that
    holds training checkpoints is an interrupted run: resuming it comes first in the message,
    since overwriting deletes them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpruceError(f"output path {path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        checkpoints = sorted((p.name for p in path.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()),
                             key=lambda n: int(n.split("-")[1]))
        if checkpoints:
            raise SpruceError(f"output folder {path} holds the checkpoints of an earlier run (up to "
                              f"{checkpoints[-1]}); pass --resume_from_checkpoint latest to continue it, or "
                              f"{flag} to start again (which deletes them), or choose another folder")
        raise SpruceError(f"output folder {path} exists and is not empty; pass {flag} "
                          "or choose another folder")
    check_writable(path)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, before any work, when `path` (a folder or file to be written) cannot be created:
    its nearest existing folder is probed by making and removing a temporary folder there (a
    permission check alone is blind to read-only file systems and to root)."""
    path = Path(path).expanduser()
    probes = [path] if path.is_dir() else []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    probes.append(parent)
    for folder in probes:
        if not folder.is_dir():
            raise SpruceError(f"cannot write the {what} {path}: {folder} is a file, not a folder; choose another path")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".spruce-write-test-", dir=folder))
        except OSError as e:
            raise SpruceError(f"cannot write the {what} {path}: {folder} is not writable "
                              f"({e.strerror or type(e).__name__}); choose another folder") from None
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 1024:,.0f} kB"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def folder_size(folder: Path) -> str:
    return _mb(folder_bytes(folder))


def is_no_space(error: BaseException, where: Path | None = None) -> bool:
    """A write failed for a full disk or quota: an OSError, safetensors' own error (the OS message
    is in its text), or torch.save's RuntimeError (which keeps only a position mismatch) while
    the disk of `where` has next to nothing free."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        return "No space left on device" in text or "Disk quota exceeded" in text
    if where is not None and isinstance(error, RuntimeError) and Path(where).exists():
        return shutil.disk_usage(where).free < 2**20
    return False


class NoSpaceError(SpruceError):
    """The disk filled up while an output was written (the partial output is already removed)."""


def no_space_error(folder: Path, needed: int | None = None, written: int | None = None) -> SpruceError:
    """The one line for a disk that filled up while writing `folder`."""
    where = Path(folder).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    need = f"about {_mb(needed)} needed, " if needed else f"more than the {_mb(written)} written, " if written else ""
    error = NoSpaceError(f"no space left on the disk of {where} while writing {Path(folder).name} ({need}"
                         f"{_mb(free)} free once the partial output is removed); free some space or choose "
                         "another folder")
    error.needed = needed
    return error


def remove_stale_partials(final: Path) -> None:
    """Remove the temporary folders that killed writes of `final` left behind (a SIGKILL runs no
    cleanup); called once `final` is written, when no other write of it can still be in progress
    in this run."""
    for old in final.parent.glob(f".{glob.escape(final.name)}.partial-*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


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
    """Yield a temporary folder that replaces `final` when the block ends without error. On an
    error the temporary folder is removed; a disk that filled up ends in one line that says how
    much was written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except NoSpaceError as e:  # raised inside by a writer that knows the size it needed
        shutil.rmtree(tmp, ignore_errors=True)
        raise no_space_error(final, needed=e.needed) from None
    except Exception as e:
        full = is_no_space(e, tmp)
        written = folder_bytes(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space_error(final, written=written) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_modes(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    remove_stale_partials(final)


def write_json(path: str | os.PathLike, record: dict, indent: int = 2) -> Path:
    """Write `record` as JSON so that `path` holds either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=indent, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise SpruceError(f"cannot write {path}: {e.strerror or type(e).__name__}; choose another path") from None
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpruceError(f"{what} {path} does not exist; check the path")
    return path
