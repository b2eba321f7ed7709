"""Object stores: where the bytes of the image store (and of the archive) live.

One small interface, :class:`ObjectStore`, with two implementations:

* :class:`LocalObjects` — a directory on a local (or mounted) disk; every write goes to a
  temporary file in the final directory, is fsynced and renamed (atomic), then the
  directory is fsynced (:func:`imaging.files.write_file_atomic`);
* :class:`S3Objects` — a bucket (and key prefix) of an S3-compatible object store
  through boto3. A PUT carries ``Content-MD5`` (the server refuses a body that arrived
  damaged) and the SHA-256 of the object as metadata (``x-amz-meta-sha256``); ``put``
  returns only after a HEAD has read back the size, the ETag (the MD5 of a single-part
  upload) and the SHA-256 metadata, so a caller that commits a catalogue row after
  ``put`` never records an object that is not there, whole. Reads of part of an object
  are HTTP range reads. Transient failures (connection errors, 5xx, throttling) are
  retried a bounded number of times (botocore's standard retry mode, ``attempts``),
  then reported as :class:`ObjectError`.

Keys are relative POSIX paths (``originals/ab/<sha256>.dcm``, ``j2k/<series>/<sop>.1.j2k``);
a key never leaves the store's directory or prefix. Originals are content addressed
(the SHA-256 is the key); codestreams are addressed by their UIDs, which never change,
and carry their SHA-256 in the object's metadata.

:class:`ReadCache` keeps recently read remote objects on the local disk by SHA-256
(bounded in bytes, oldest evicted first); a cached copy is used only when its size and
SHA-256 match what the catalogue records, so a damaged cache costs a re-read, never a
wrong byte.

``open_objects(url)`` makes the right one from a URL: a directory path, or
``s3://bucket/prefix`` (endpoint, region and credentials from arguments, else from the
``MEDVIEW_S3_ENDPOINT`` / ``AWS_*`` environment variables).
"""
from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol

from imaging.files import TMP_MARK, ensure_dir, fsync_dir, write_file_atomic

from . import faults

__all__ = ["ObjectStore", "LocalObjects", "S3Objects", "ReadCache", "ObjectError",
           "ObjectMissing", "open_objects", "s3_client"]


class ObjectError(Exception):
    """The object store cannot be reached, refused a request, or an object is damaged."""


class ObjectMissing(ObjectError):
    """No object under that key."""


def check_key(key: str) -> str:
    """A key as a clean relative POSIX path; refuses keys that would leave the store."""
    k = PurePosixPath(str(key).replace(os.sep, "/"))
    if k.is_absolute() or ".." in k.parts or not k.parts or str(k) in (".", ""):
        raise ObjectError(f"not an object key: {key!r}")
    return k.as_posix()


class ObjectStore(Protocol):
    """Where objects live. ``put`` returns only once the object is durable and checked."""

    url: str
    remote: bool                    # True: reads cross the network (use a read cache)

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...                       # ObjectMissing if absent
    def get_range(self, key: str, start: int, end: int) -> bytes: ...   # bytes [start, end)
    def size(self, key: str) -> int | None: ...                 # None: absent
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...                     # True: it was there
    def keys(self, prefix: str = "") -> Iterator[str]: ...


# --------------------------------------------------------------------------- local disk
class LocalObjects:
    """Objects as files under ``root`` (the hot store, or an archive disk).

    ``create``: make ``root`` when missing; otherwise a missing root is an error (an
    unmounted archive disk must not silently become an empty folder on another disk)."""

    remote = False

    def __init__(self, root: str | Path, create: bool = True, writer=None) -> None:
        self.root = Path(root).resolve()
        self.create = create
        self.url = str(self.root)
        self.writer = writer or write_file_atomic    # (path, bytes): atomic and durable

    def path(self, key: str) -> Path:
        if not self.root.is_dir():
            if not self.create:
                raise ObjectError(f"the directory {self.root} does not exist (disk not mounted?)")
            self.root.mkdir(parents=True, exist_ok=True)
        return self.root.joinpath(*PurePosixPath(check_key(key)).parts)

    def put(self, key: str, data: bytes) -> None:
        p = self.path(key)
        _ensure_dir(p.parent)
        self.writer(p, data)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"{key} is missing ({self.url})") from None
        except IsADirectoryError:
            raise ObjectMissing(f"{key} is missing ({self.url})") from None
        except OSError as e:
            raise ObjectError(f"{self.url}: cannot read {key}: {e}") from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except FileNotFoundError:
            raise ObjectMissing(f"{key} is missing ({self.url})") from None
        except OSError as e:
            raise ObjectError(f"{self.url}: cannot read {key}: {e}") from None

    def size(self, key: str) -> int | None:
        p = self.path(key)
        try:
            return p.stat().st_size if p.is_file() else None
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        p = self.path(key)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(p.parent)
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            if not self.create:
                raise ObjectError(f"the directory {self.root} does not exist")
            return
        base = self.root / prefix if prefix else self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()


_ensure_dir = ensure_dir     # imaging.files: created with durable directory entries


# --------------------------------------------------------------------------- S3
_MISSING_CODES = ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def s3_client(endpoint: str | None = None, *, region: str | None = None,
              access_key: str | None = None, secret_key: str | None = None,
              attempts: int = 4, timeout_s: float = 30.0):
    """A boto3 S3 client with bounded retries and timeouts. ``endpoint`` (an
    S3-compatible server) defaults to ``MEDVIEW_S3_ENDPOINT``; credentials to boto3's
    usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, roles)."""
    try:
        import boto3  # type: ignore[import-not-found]
        from botocore.config import Config  # type: ignore[import-not-found]
    except ImportError:
        raise ObjectError("an S3 object store needs the boto3 package (not installed)") from None
    endpoint = endpoint or os.environ.get("MEDVIEW_S3_ENDPOINT") or None
    cfg = Config(retries={"mode": "standard", "max_attempts": max(1, attempts)},
                 connect_timeout=min(10.0, timeout_s), read_timeout=timeout_s,
                 s3={"addressing_style": "path"},
                 max_pool_connections=32)
    kw = {}
    if access_key or secret_key:
        kw.update(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    return boto3.client("s3", endpoint_url=endpoint,
                        region_name=region or os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                        config=cfg, **kw)


class S3Objects:
    """Objects in an S3 bucket under ``prefix``, through a boto3 S3 client.

    Calls used: ``put_object``, ``get_object`` (with ``Range``), ``head_object``,
    ``delete_object``, ``list_objects_v2``. ``verify``: after a PUT, ``"head"`` checks
    size, ETag and SHA-256 metadata with a HEAD; ``"read"`` reads the whole object back
    and hashes it (the archive uses that: it deletes the hot copy afterwards)."""

    remote = True

    def __init__(self, client, bucket: str, prefix: str = "", *, verify: str = "head") -> None:
        if not 3 <= len(bucket) <= 63:
            raise ObjectError(f"S3 bucket names have 3 to 63 characters: {bucket!r}")
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.verify = verify

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, what: str, key: str, e: BaseException) -> ObjectError:
        if _error_code(e) in _MISSING_CODES:
            return ObjectMissing(f"{key} is missing ({self.url})")
        return ObjectError(f"{self.url}: cannot {what} {key}: {e}")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a new deployment)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - any client failure
            if _error_code(e) not in _MISSING_CODES:
                raise ObjectError(f"{self.url}: cannot reach the bucket: {e}") from e
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except Exception as e2:  # noqa: BLE001
                if _error_code(e2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise ObjectError(f"{self.url}: cannot create the bucket: {e2}") from e2

    def put(self, key: str, data: bytes) -> None:
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        md5 = hashlib.md5(data, usedforsecurity=False)
        k = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data,
                                   ContentMD5=base64.b64encode(md5.digest()).decode(),
                                   Metadata={"sha256": sha})
        except Exception as e:  # noqa: BLE001 - any client failure is a store failure
            raise ObjectError(f"{self.url}: cannot store {key}: {e}") from e
        faults.point("objects.put-sent")
        if self.verify == "read":
            got = self.get(key)
            if len(got) != len(data) or hashlib.sha256(got).hexdigest() != sha:
                raise ObjectError(f"{self.url}: {key} does not read back as written")
            return
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=k)
        except Exception as e:  # noqa: BLE001
            raise self._fail("check", key, e) from e
        etag = str(h.get("ETag", "")).strip('"')
        meta = {str(a).lower(): b for a, b in (h.get("Metadata") or {}).items()}
        if (int(h.get("ContentLength", -1)) != len(data) or meta.get("sha256") != sha
                or ("-" not in etag and etag and etag != md5.hexdigest())):
            raise ObjectError(f"{self.url}: {key} does not read back as written "
                              f"(size {h.get('ContentLength')}, ETag {etag})")

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise self._fail("read", key, e) from e

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={start}-{end - 1}")["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise self._fail("read", key, e) from e
        if len(body) != end - start:
            raise ObjectError(f"{self.url}: range {start}-{end} of {key} came back with "
                              f"{len(body)} bytes")
        return body

    def head(self, key: str) -> dict | None:
        """Size and SHA-256 metadata of an object, or None if it is absent."""
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:  # noqa: BLE001
            err = self._fail("reach", key, e)
            if isinstance(err, ObjectMissing):
                return None
            raise err from e
        meta = {str(a).lower(): b for a, b in (h.get("Metadata") or {}).items()}
        return {"size": int(h.get("ContentLength", -1)), "sha256": meta.get("sha256")}

    def size(self, key: str) -> int | None:
        h = self.head(key)
        return None if h is None else h["size"]

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete(self, key: str) -> bool:
        there = self.exists(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:  # noqa: BLE001
            if _error_code(e) not in _MISSING_CODES:
                raise ObjectError(f"{self.url}: cannot delete {key}: {e}") from e
        return there

    def keys(self, prefix: str = "") -> Iterator[str]:
        token = None
        full = self.prefix + (check_key(prefix) + "/" if prefix else "")
        while True:
            kw = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            try:
                page = self.client.list_objects_v2(**kw)
            except Exception as e:  # noqa: BLE001
                raise ObjectError(f"{self.url}: cannot list: {e}") from e
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")


# --------------------------------------------------------------------------- read cache
class ReadCache:
    """Recently read objects on the local disk, by SHA-256, at most ``budget`` bytes.

    ``get(sha, size)`` returns the bytes only if they still hash to ``sha``; ``put``
    writes atomically (a crash leaves a temporary file, cleared on start). Eviction:
    least recently used first (file access times are refreshed on every hit)."""

    def __init__(self, root: str | Path, budget: int = 1 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self._lock = threading.Lock()
        self._size = 0
        for p in self.root.rglob("*"):
            if p.is_file():
                if TMP_MARK in p.name:
                    p.unlink(missing_ok=True)
                else:
                    self._size += p.stat().st_size
        self.hits = self.misses = 0

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def get(self, sha: str, size: int | None = None) -> bytes | None:
        p = self._path(sha)
        try:
            data = p.read_bytes()
        except OSError:
            self.misses += 1
            return None
        if (size is not None and len(data) != size) or hashlib.sha256(data).hexdigest() != sha:
            p.unlink(missing_ok=True)          # damaged: read the object again
            self.misses += 1
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        self.hits += 1
        return data

    def put(self, sha: str, data: bytes) -> None:
        if len(data) > self.budget:
            return
        p = self._path(sha)
        if p.exists():
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + TMP_MARK + f"{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._size += len(data)
            over = self._size > self.budget
        if over:
            self._evict()

    def _evict(self) -> None:
        with self._lock:
            files = []
            for q in self.root.rglob("*"):
                try:
                    st = q.stat()
                except OSError:
                    continue
                if q.is_file():
                    files.append((st.st_atime, st.st_size, q))
            files.sort()
            total = sum(s for _a, s, _q in files)
            for _a, s, q in files:
                if total <= self.budget * 9 // 10:
                    break
                q.unlink(missing_ok=True)
                total -= s
            self._size = total


# --------------------------------------------------------------------------- opening
def open_objects(url: str, *, endpoint: str | None = None, create: bool = True,
                 verify: str = "head", client=None) -> ObjectStore:
    """The object store at ``url``: ``s3://bucket/prefix`` or a directory."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Objects(client or s3_client(endpoint), bucket, prefix, verify=verify)
    return LocalObjects(url, create=create)
