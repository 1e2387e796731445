"""Data files from the internet: one way to locate, download, verify and cache them.

Every file the workbench needs from the internet is described once as a :class:`DataFile` (public
address, sha256, size, an environment variable that overrides it) and obtained with :func:`fetch`:

1. an explicit ``path`` argument, else the file's environment variable (e.g. ``MATREC_SHAKESPEARE``),
   names a local copy: it is used as is after its checksum is verified;
2. else the cached copy ``$MATREC_CACHE/<name>`` (default ``~/.cache/matrec``) is verified and used;
3. else, unless ``MATREC_OFFLINE=1``, the file is downloaded from its address into a temporary file
   beside the cache entry, verified, and renamed into place (atomic: a crash leaves no half file).

A file whose checksum does not match is never used and never silently re-downloaded:
:class:`DataFileError` names the file, the expected and actual sha256 and how to fix it. When the
file is missing and cannot be downloaded the error says where to put it or which variable to set.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class DataFileError(RuntimeError):
    """A data file is missing, unreachable or corrupt; the message says how to fix it."""


@dataclass(frozen=True)
class DataFile:
    """One file from the internet.

    Attributes:
        name: file name in the cache directory.
        urls: public addresses, tried in order.
        sha256: hex digest the file must have.
        size: size in bytes (for messages).
        env: environment variable that points at a local copy (overrides the cache).
    """

    name: str
    urls: tuple[str, ...]
    sha256: str
    size: int
    env: str | None = None


SHAKESPEARE = DataFile(
    name="tinyshakespeare.txt",
    urls=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    size=1_115_394,
    env="MATREC_SHAKESPEARE",
)

# MNIST: the four IDX archives (Y. LeCun's files; the S3 mirror is the one torchvision uses because
# the original host often refuses scripted downloads). MATREC_MNIST points at a folder holding them.
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST = {
    key: DataFile(name=fname, urls=tuple(m + fname for m in _MNIST_MIRRORS), sha256=digest, size=size)
    for key, fname, digest, size in (
        ("train_images", "train-images-idx3-ubyte.gz",
         "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9_912_422),
        ("train_labels", "train-labels-idx1-ubyte.gz",
         "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28_881),
        ("test_images", "t10k-images-idx3-ubyte.gz",
         "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1_648_877),
        ("test_labels", "t10k-labels-idx1-ubyte.gz",
         "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4_542),
    )
}


def cache_dir() -> Path:
    """The cache directory: ``$MATREC_CACHE``, default ``~/.cache/matrec``."""
    return Path(os.environ.get("MATREC_CACHE") or Path.home() / ".cache" / "matrec").expanduser()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, spec: DataFile, how_to_fix: str) -> Path:
    """Return ``path`` if its sha256 is ``spec.sha256``, else raise :class:`DataFileError`."""
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise DataFileError(
            f"{path} is corrupt or not the expected {spec.name}: sha256 {actual}, expected "
            f"{spec.sha256} ({spec.size:,} bytes, from {spec.urls[0]}). {how_to_fix}"
        )
    return path


def usable_cache(folder: Path) -> Path:
    """``folder``, created, once a file has been written and removed there; else a
    :class:`DataFileError` saying so. Called before work whose result goes there (a download, a
    tokenizer's training), so an unusable cache is found before that work, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataFileError(f"the cache folder {folder} is not usable ({e.strerror or e}); set "
                            f"MATREC_CACHE to a writable folder") from None
    return folder


def _urlopen(url: str, timeout: float = 60.0):
    """Open ``url`` (a seam the tests replace to simulate the network)."""
    return urllib.request.urlopen(url, timeout=timeout)


def _offline() -> bool:
    return os.environ.get("MATREC_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _supply_hint(spec: DataFile, target: Path) -> str:
    via_env = f"set {spec.env}=/path/to/{spec.name}, " if spec.env else ""
    return (f"To supply it by hand, {via_env}pass its path to the task, or copy it to {target} "
            f"(download {spec.urls[0]}, sha256 {spec.sha256}).")


def fetch(spec: DataFile, path: str | os.PathLike | None = None, *, directory: Path | None = None) -> Path:
    """Locate ``spec`` (explicit path, environment variable, cache, download) and verify it.

    Args:
        spec: the file.
        path: a local copy that overrides everything else.
        directory: where the cached copy lives (default :func:`cache_dir`).

    Returns:
        The path of a verified copy.

    Raises:
        DataFileError: the file is corrupt, or missing and cannot be downloaded.
    """
    override = path if path is not None else (os.environ.get(spec.env) if spec.env else None)
    if override:
        local = Path(override).expanduser()
        source = "the path given" if path is not None else f"${spec.env}"
        if not local.is_file():
            raise DataFileError(f"{local} (from {source}) does not exist or is not a file; "
                                f"point it at a copy of {spec.name} ({spec.urls[0]})")
        return verify(local, spec, f"Point {source} at an intact copy of {spec.name}.")
    target = (directory or cache_dir()) / spec.name
    if target.exists():
        return verify(target, spec, f"Delete {target} to download it again, or replace it with an "
                                    f"intact copy.")
    if _offline():
        raise DataFileError(f"{spec.name} is not in the cache and MATREC_OFFLINE is set. "
                            + _supply_hint(spec, target))
    usable_cache(target.parent)
    errors = []
    for url in spec.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            print(f"matrec: downloading {spec.name} ({spec.size:,} bytes) from {url} to {target}",
                  file=sys.stderr)
            with os.fdopen(fd, "wb") as out, _urlopen(url) as response:
                shutil.copyfileobj(response, out)
            verify(tmp, spec, "The download was corrupted or the file at the address changed; "
                              "nothing was written to the cache. " + _supply_hint(spec, target))
            os.replace(tmp, target)
            return target
        # a connection dropped mid-body raises http.client.IncompleteRead, an HTTPException, not an OSError
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            errors.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataFileError(f"could not download {spec.name} ({'; '.join(errors)}). "
                        + _supply_hint(spec, target))


def atomic_write_bytes(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` through a temporary file and a rename (never a half file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target
