"""Put and get named objects under a base URL, on local disk or in GCS.

Writes are create-only: putting a name that already exists raises `ObjectExists`, so a
finished artifact is never silently overwritten. Names are relative, '/'-separated paths
(e.g. ``"shards/000001.tar"``). The tool never deletes objects, so there is no ``delete``.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

from distill.errors import DistillError

if TYPE_CHECKING:
    from google.cloud import storage as gcs

TMP_PREFIX = ".tmp-"


class StorageError(DistillError):
    """A storage operation failed in a way the user can fix."""


class ObjectExists(StorageError):
    """A create-only write found the object already there."""


class ObjectNotFound(StorageError):
    """The object to read does not exist."""


class BucketNotFound(StorageError):
    """The GCS bucket does not exist."""


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object name {name!r}: use a relative path like 'a/b.tar'")
    if parts[-1].startswith(TMP_PREFIX):
        raise StorageError(
            f"invalid object name {name!r}: names starting with {TMP_PREFIX!r} "
            "are reserved for temporary files"
        )
    return name


def _tmp_sibling(dest: Path) -> Path:
    """A temp name next to ``dest`` (its directory is created if needed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f"{TMP_PREFIX}{dest.name}.{uuid.uuid4().hex}")


@dataclass(frozen=True)
class ObjectInfo:
    """An object's name (relative to the store), size and the content hash the store keeps
    without reading it (GCS: ``md5:<base64>``, or ``crc32c:<base64>`` for a composite object;
    a local store keeps none: ``""``); ``generation``: GCS's number for this version of it
    (0 for a local store)."""

    name: str
    size: int
    content_hash: str = ""
    generation: int = 0


class Store(ABC):
    """Named objects under the base URL `url`."""

    url: str

    def join(self, name: str) -> str:
        """Full URL (or local path) of `name`."""
        return f"{self.url.rstrip('/')}/{_check_name(name)}"

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted names (relative to the base) starting with `prefix`."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """:meth:`list` with each object's size and stored content hash, in one listing."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The object's content; raises ObjectNotFound if it is missing."""

    @abstractmethod
    def read_range(self, name: str, start: int, end: int, generation: int = 0) -> bytes:
        """Bytes ``[start, end)`` of the object (one ranged read); ObjectNotFound if missing.
        ``generation``: that version only (GCS; 0: the live one)."""

    @abstractmethod
    def download(self, name: str, dest: Path, generation: int = 0) -> None:
        """Copy the object to `dest` atomically (temp file next to `dest`, then os.replace);
        missing parent directories are created. ``generation``: that version only (GCS)."""

    @abstractmethod
    def put_file(self, name: str, src: Path) -> None:
        """Create the object from a local file; raises ObjectExists if it exists."""

    @abstractmethod
    def put_bytes(self, name: str, data: bytes) -> None:
        """Create the object from bytes; raises ObjectExists if it exists."""

    def put_files(
        self,
        files: builtins.list[tuple[str, Path]],
        workers: int = 8,
        done: Callable[[str, int], None] | None = None,
    ) -> builtins.list[str]:
        """Create many objects ``(name, local file)``, ``workers`` at once; ``done(name,
        bytes)`` after each. An object that exists already is left as it is and returned (the
        caller decides whether that is fine): the writes stay create-only.

        (google-cloud-storage's ``transfer_manager.upload_many`` has no per-file callback for
        a progress bar, and its ``skip_if_exists`` rests on the precondition alone, which the
        GCS emulator ignores on resumable uploads: :meth:`put_file` checks first too.)"""

        def one(item: tuple[str, Path]) -> str | None:
            name, path = item
            try:
                self.put_file(name, path)
            except ObjectExists:
                return name
            finally:
                if done is not None:
                    done(name, Path(path).stat().st_size)
            return None

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            return [n for n in pool.map(one, files) if n is not None]

    def download_many(
        self,
        names: builtins.list[str],
        dest: Path,
        workers: int = 8,
        done: Callable[[str, int], None] | None = None,
    ) -> None:
        """:meth:`download` each name to ``dest / name``, ``workers`` at once."""

        def one(name: str) -> None:
            self.download(name, Path(dest) / name)
            if done is not None:
                done(name, (Path(dest) / name).stat().st_size)

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(one, names))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_store(url: str) -> Store:
    """A store for a local path, a ``file://`` URL or ``gs://bucket[/prefix]``."""
    if url.startswith("gs://"):
        bucket, _, prefix = url[len("gs://") :].partition("/")
        if not bucket:
            raise StorageError(f"invalid GCS URL {url!r}: expected gs://BUCKET[/PREFIX]")
        return GCSStore(bucket, prefix.strip("/"))
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"invalid file URL {url!r}: expected file:///absolute/path")
        return LocalStore(Path(url2pathname(parsed.path)))
    if "://" in url:
        raise StorageError(f"unsupported storage URL {url!r}: use a local path or gs://BUCKET")
    return LocalStore(Path(url))


class LocalStore(Store):
    """Objects as files under a local directory; `url` is the absolute directory path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*_check_name(name).split("/"))

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        dirs = prefix.split("/")[:-1]
        if prefix.startswith("/") or any(d in ("", ".", "..") for d in dirs):
            raise StorageError(f"invalid list prefix {prefix!r}: use a relative path like 'a/'")
        # Walk only the deepest directory the prefix fully names.
        start = self.root.joinpath(*dirs)
        if not start.is_dir():
            return []
        names = []
        for dirpath, _, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                name = f if rel == "." else f"{rel}/{f}"
                if not f.startswith(TMP_PREFIX) and name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return [ObjectInfo(n, self._path(n).stat().st_size) for n in self.list(prefix)]

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"object {self.join(name)} does not exist") from None

    def read_range(self, name: str, start: int, end: int, generation: int = 0) -> bytes:
        try:
            with self._path(name).open("rb") as fh:
                fh.seek(start)
                return fh.read(max(0, end - start))
        except FileNotFoundError:
            raise ObjectNotFound(f"object {self.join(name)} does not exist") from None

    def download(self, name: str, dest: Path, generation: int = 0) -> None:
        src = self._path(name)
        tmp = _tmp_sibling(Path(dest))
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError:
            if not src.is_file():
                raise ObjectNotFound(f"object {self.join(name)} does not exist") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, name: str, src: Path) -> None:
        try:
            with open(src, "rb") as f:
                self._create(name, lambda out: shutil.copyfileobj(f, out, 1 << 20))
        except FileNotFoundError:
            raise StorageError(f"cannot upload {src} to {self.join(name)}: no such file") from None

    def put_bytes(self, name: str, data: bytes) -> None:
        self._create(name, lambda out: out.write(data))

    def _create(self, name: str, write) -> None:
        """Write to a temp file, then hard-link it to the final name (fails if it exists)."""
        dest = self._path(name)
        if dest.exists():  # cheap early exit; os.link below is the real guard
            raise ObjectExists(f"object {self.join(name)} already exists (writes are create-only)")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create directory for {self.join(name)}: {e}") from e
        tmp = _tmp_sibling(dest)
        try:
            with open(tmp, "xb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, dest)
        except FileExistsError:
            raise ObjectExists(
                f"object {self.join(name)} already exists (writes are create-only)"
            ) from None
        except OSError as e:
            raise StorageError(f"cannot write {self.join(name)}: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)


# Permission each operation needs, for Forbidden messages.
_PERMISSION = {
    "list": "storage.objects.list",
    "read": "storage.objects.get",
    "write": "storage.objects.create",
}


class GCSStore(Store):
    """Objects in a GCS bucket under an optional prefix, via google-cloud-storage.

    Honours STORAGE_EMULATOR_HOST (anonymous credentials) for local runs and tests.
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._bucket: gcs.Bucket | None = None
        self._lock = threading.Lock()

    @property
    def bucket(self) -> gcs.Bucket:
        """The bucket handle; the client is created on first use."""
        with self._lock:
            if self._bucket is None:
                self._bucket = self._make_client().bucket(self.bucket_name)
            return self._bucket

    def _make_client(self) -> gcs.Client:
        import google.auth.credentials
        import google.auth.exceptions
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return storage.Client(
                project=os.environ.get("GOOGLE_CLOUD_PROJECT", "distill-local"),
                credentials=google.auth.credentials.AnonymousCredentials(),
            )
        try:
            return storage.Client()
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise StorageError(
                f"no Google Cloud credentials to access {self.url}: run "
                "`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
                "to a service-account key file"
            ) from e

    def _key(self, name: str) -> str:
        name = _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _errors(self, op: str, name: str | None = None) -> Iterator[None]:
        """Translate google-cloud errors into StorageErrors naming the object or bucket."""
        from google.api_core import exceptions as gex
        from google.auth import exceptions as auth_ex

        what = self.join(name) if name else self.url
        bucket = f"gs://{self.bucket_name}"
        try:
            yield
        except gex.PreconditionFailed:
            raise ObjectExists(f"object {what} already exists (writes are create-only)") from None
        except gex.NotFound:
            if op == "read" and self.bucket.exists():
                raise ObjectNotFound(f"object {what} does not exist") from None
            raise BucketNotFound(
                f"bucket {bucket} does not exist "
                f"(create it, e.g. `gcloud storage buckets create {bucket}`)"
            ) from None
        except gex.Forbidden as e:
            raise StorageError(
                f"permission denied for {what}: the active credentials lack "
                f"{_PERMISSION[op]} on bucket {bucket} ({e.message})"
            ) from None
        except auth_ex.RefreshError as e:
            raise StorageError(
                f"Google Cloud credentials expired or invalid while accessing {what}: run "
                "`gcloud auth application-default login` or check GOOGLE_APPLICATION_CREDENTIALS"
            ) from e
        except gex.GoogleAPICallError as e:
            raise StorageError(f"GCS {op} of {what} failed: {e}") from e

    def exists(self, name: str) -> bool:
        # Note: returns False (not BucketNotFound) when the bucket itself is missing.
        with self._errors("read", name):
            return self.bucket.blob(self._key(name)).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list"):
            keys = [b.name for b in self.bucket.list_blobs(prefix=base + prefix)]
        return sorted(k[len(base) :] for k in keys if not k.endswith("/"))

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list"):
            blobs = list(self.bucket.list_blobs(prefix=base + prefix))
        infos = [
            ObjectInfo(
                b.name[len(base) :],
                int(b.size or 0),
                f"md5:{b.md5_hash}" if b.md5_hash else f"crc32c:{b.crc32c or ''}",
                int(b.generation or 0),
            )
            for b in blobs
            if not b.name.endswith("/")
        ]
        return sorted(infos, key=lambda i: i.name)

    def read_bytes(self, name: str) -> bytes:
        with self._errors("read", name):
            return self.bucket.blob(self._key(name)).download_as_bytes()

    def read_range(self, name: str, start: int, end: int, generation: int = 0) -> bytes:
        if end <= start:
            return b""
        blob = self.bucket.blob(self._key(name), generation=generation or None)
        with self._errors("read", name):  # the client's end is inclusive
            return blob.download_as_bytes(start=start, end=end - 1)

    def download(self, name: str, dest: Path, generation: int = 0) -> None:
        tmp = _tmp_sibling(Path(dest))
        try:
            with self._errors("read", name):
                blob = self.bucket.blob(self._key(name), generation=generation or None)
                blob.download_to_filename(str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, name: str, src: Path) -> None:
        if not Path(src).is_file():
            raise StorageError(f"cannot upload {src} to {self.join(name)}: no such file")
        self._create(name, lambda blob: blob.upload_from_filename(str(src), if_generation_match=0))

    def put_bytes(self, name: str, data: bytes) -> None:
        self._create(name, lambda blob: blob.upload_from_string(data, if_generation_match=0))

    def _create(self, name: str, upload) -> None:
        blob = self.bucket.blob(self._key(name))
        # Belt-and-braces: real GCS enforces if_generation_match=0 atomically, but
        # fake-gcs-server ignores it on resumable uploads (> 8 MiB), so check first too.
        with self._errors("read", name):
            present = blob.exists()
        if present:
            raise ObjectExists(f"object {self.join(name)} already exists (writes are create-only)")
        with self._errors("write", name):
            upload(blob)
