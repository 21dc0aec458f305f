"""fsspec access for every URL the product touches: atomic writes, retries with backoff, pyarrow adapters."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth retrying: network hiccups and throttling surface as these across s3fs/gcsfs/aiohttp.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)
NOT_TRANSIENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                   NotADirectoryError, FileExistsError)


# Non-secret settings that select an S3-compatible endpoint; forwarded to every actor and task, because a
# variable set where the job starts does not reach processes on other nodes. Credentials are never forwarded.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://") or url.startswith("local://")


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or plain path; storage options apply to remote URLs only."""
    options = {} if is_local(url) else dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and url.split("://", 1)[0] in ("s3", "s3a") and "endpoint_url" not in options:
        # Explicit, so the filesystem keeps it when pickled into tasks on nodes without the variable.
        options["endpoint_url"] = endpoint
    return url_to_fs(url, **options)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.2) -> T:
    """Run fn, retrying transient storage errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except NOT_TRANSIENT:
            raise
        except TRANSIENT_ERRORS as exc:
            if attempt == attempts:
                raise
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("storage: %s failed (%s: %s); retry %d/%d in %.1fs",
                        what, type(exc).__name__, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


STORAGE_HINTS = (
    (("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError"),
     "no usable credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage_options"),
    (("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
      "ConnectionRefusedError", "TimeoutError", "gaierror"),
     "the storage endpoint cannot be reached: check the URL, AWS_ENDPOINT_URL and the network"),
    (("PermissionError", "AccessDenied", "Forbidden"), "access denied: check the credentials' permissions there"),
    (("FileExistsError", "NotADirectoryError"), "a file is in the way where a directory is needed: choose another path"),
    (("FileNotFoundError", "NoSuchBucket"), "it does not exist: check the path (and that the bucket exists)"),
)
"""Exception class names (anywhere in the class's ancestry) -> what the user should check."""


def failure(url: str, exc: BaseException, doing: str = "read") -> str:
    """One line for a storage error on `url`: the error and what to check, e.g. for a missing credential."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    hint = next((text for classes, text in STORAGE_HINTS if names & set(classes)), None)
    detail = str(exc).splitlines()[0] if str(exc).strip() else "no detail"
    return f"{url} cannot be {doing}: {type(exc).__name__}: {detail}" + (f"; {hint}" if hint else "")


def hidden_temp_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # A leading dot hides in-progress files from pyarrow, pandas, Spark and webdataset globs.
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    temp = f".{name}.inprogress-{uuid.uuid4().hex[:12]}"
    return f"{parent}/{temp}" if parent else temp


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write bytes so that readers see either nothing or the whole object, never a partial one.

    Object stores (S3, GCS) commit a PUT atomically; local and POSIX-like filesystems get a
    hidden temporary file in the same directory, renamed into place.
    """

    def write() -> None:
        if _is_posix_like(fs):
            parent = path.rsplit("/", 1)[0] if "/" in path else "."
            fs.makedirs(parent, exist_ok=True)
            temp = hidden_temp_path(fs, path)
            try:
                with fs.open(temp, "wb") as fh:
                    fh.write(data)
                    if hasattr(fh, "flush"):
                        fh.flush()
                    if hasattr(fh, "fileno"):
                        try:
                            os.fsync(fh.fileno())
                        except (OSError, ValueError, AttributeError):
                            pass
                fs.mv(temp, path)
            except BaseException:
                try:
                    fs.rm(temp)
                except (OSError, FileNotFoundError):
                    pass
                raise
        else:
            fs.pipe_file(path, data)

    with_retries(write, what=f"write {path}")


def _is_posix_like(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("file", "local") for p in protocols)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return with_retries(lambda: fs.cat_file(path), what=f"read {path}")


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return with_retries(lambda: fs.exists(path), what=f"stat {path}")


def listdir(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Paths directly under path; empty when it does not exist."""

    def ls() -> list[str]:
        try:
            return [entry if isinstance(entry, str) else entry["name"] for entry in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    fs.invalidate_cache(path)
    return with_retries(ls, what=f"list {path}")


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """Wrap an fsspec filesystem so pyarrow and Ray Data read through the same credentials and endpoint."""
    import pyarrow.fs as pafs

    if _is_posix_like(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
