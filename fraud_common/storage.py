"""Storage I/O for local paths and ``s3://bucket/key`` URIs, through one MinIO client.

Every step reads and writes through these functions, so a step does not care whether its data
lives on the laptop or in MinIO. Local writes go to a temporary file first and are renamed into
place, so a failed write never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from fraud_common.settings import Settings

S3_SCHEMES = ("s3", "s3a")


class StorageError(RuntimeError):
    """A URI cannot be read or written."""


def _s3_failure(err: BaseException, uri: str, settings: Settings) -> StorageError | None:
    """A one-line ``StorageError`` for what the S3 client raised, or None if it is not an S3 failure."""
    from minio.error import MinioException, S3Error
    from urllib3.exceptions import HTTPError

    endpoint = settings.s3_endpoint or "AWS S3"
    if isinstance(err, S3Error):
        return StorageError(f"S3 at {endpoint} refused {uri}: {err.code} ({err.message}); check the bucket and the credentials")
    if isinstance(err, (HTTPError, MinioException, ConnectionError)):
        return StorageError(f"S3 endpoint {endpoint} is unreachable for {uri} ({type(err).__name__}); check S3_ENDPOINT_URL and that the server runs")
    return None


def _s3_errors(fn):  # noqa: ANN001, ANN202 - keeps the wrapped signature
    """Turn the S3 client's exceptions (refusals, unreachable endpoint) into ``StorageError``.

    The URI named in the message is the call's first ``s3://`` argument.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as err:
            values = [*args, *kwargs.values()]
            settings = next((v for v in values if isinstance(v, Settings)), None)
            uri = next((v for v in values if isinstance(v, str) and is_s3(v)), None)
            failure = _s3_failure(err, uri, settings) if settings is not None and uri else None
            if failure is None:
                raise
            raise failure from err

    return wrapper


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an object in an S3-compatible store."""
    return urlparse(uri).scheme in S3_SCHEMES


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(uri)
    if parsed.scheme not in S3_SCHEMES or not parsed.netloc:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def to_s3a(uri: str) -> str:
    """The Hadoop ``s3a://`` form of an ``s3://`` URI (Spark reads S3 through s3a)."""
    return "s3a://" + uri.split("://", 1)[1] if is_s3(uri) else uri


@lru_cache(maxsize=8)
def _client(endpoint: str, access_key: str, secret_key: str, region: str):  # noqa: ANN202
    from minio import Minio

    if not endpoint:
        endpoint = "https://s3.amazonaws.com"
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    return Minio(
        parsed.netloc,
        access_key=access_key or None,
        secret_key=secret_key or None,
        region=region or None,
        secure=parsed.scheme == "https",
    )


def s3_client(settings: Settings):  # noqa: ANN201 - minio.Minio, imported lazily
    """The MinIO client for the endpoint and credentials in ``settings``."""
    return _client(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.s3_region)


@_s3_errors
def exists(uri: str, settings: Settings) -> bool:
    """Whether a file, a folder or any object under the prefix exists."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client(settings)
    if not client.bucket_exists(bucket):
        return False
    return any(True for _ in client.list_objects(bucket, prefix=key, recursive=True))


@_s3_errors
def list_files(uri: str, settings: Settings) -> list[str]:
    """Every file under a folder or prefix, as URIs of the same kind, sorted."""
    if not is_s3(uri):
        root = Path(uri)
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    objects = s3_client(settings).list_objects(bucket, prefix=prefix, recursive=True)
    return sorted(f"s3://{bucket}/{o.object_name}" for o in objects)


@_s3_errors
def read_bytes(uri: str, settings: Settings) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no such file: {uri}") from None
    bucket, key = split_s3(uri)
    from minio.error import S3Error

    try:
        response = s3_client(settings).get_object(bucket, key)
    except S3Error as err:
        raise StorageError(f"cannot read {uri}: {err.code}") from err
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


@_s3_errors
def write_bytes(uri: str, data: bytes, settings: Settings) -> None:
    """Write a file atomically (temporary file, then rename) or put one object."""
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    import io

    bucket, key = split_s3(uri)
    ensure_bucket(bucket, settings)
    s3_client(settings).put_object(bucket, key, io.BytesIO(data), length=len(data))


def ensure_bucket(bucket: str, settings: Settings) -> None:
    """Create the bucket if it does not exist yet."""
    client = s3_client(settings)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)


@_s3_errors
def upload(local: str | Path, uri: str, settings: Settings) -> list[str]:
    """Copy a local file or folder to ``uri`` (local or S3); returns the URIs written."""
    local = Path(local)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    if not local.exists():
        raise StorageError(f"nothing to upload at {local}")
    written = []
    if not is_s3(uri):
        target = Path(uri)
        if local.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        else:
            shutil.copytree(local, target, dirs_exist_ok=True)
        return [str(target)] if local.is_file() else [str(target / p.relative_to(local)) for p in files]
    bucket, key = split_s3(uri)
    ensure_bucket(bucket, settings)
    client = s3_client(settings)
    for path in files:
        object_name = key if local.is_file() else join(key, path.relative_to(local).as_posix())
        client.fput_object(bucket, object_name, str(path))
        written.append(f"s3://{bucket}/{object_name}")
    return written


@_s3_errors
def download(uri: str, local: str | Path, settings: Settings) -> Path:
    """Copy a file or a folder/prefix from ``uri`` to the local path ``local``."""
    local = Path(local)
    if not is_s3(uri):
        source = Path(uri)
        if not source.exists():
            raise StorageError(f"no such file or folder: {uri}")
        if source.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, local)
        else:
            shutil.copytree(source, local, dirs_exist_ok=True)
        return local
    bucket, key = split_s3(uri)
    client = s3_client(settings)
    names = [o.object_name for o in client.list_objects(bucket, prefix=key, recursive=True)]
    if not names:
        raise StorageError(f"no such object or prefix: {uri}")
    if names == [key]:
        local.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, key, str(local))
        return local
    prefix = key.rstrip("/") + "/"
    for name in names:
        if name.startswith(prefix):
            client.fget_object(bucket, name, str(local / name[len(prefix):]))
    return local


def share_published_file(source: str | Path, target: str | Path) -> Path:
    """Put a published, never-modified file at ``target``: a hard link where both are on one
    local file system, else a copy. Either way the file appears whole (temporary name, rename).

    For write-once artifacts only (a version's feature store snapshot): a link shares the bytes,
    so the file is made read-only first, and a writer that opens it anyway fails instead of
    changing every version that shares it. At 1M users the SQLite online store is 1.45 GB:
    each copy costs seconds, a link nothing.
    """
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.chmod(source, 0o444)
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        # rename(2) leaves both names when they already are links to one file
        tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def local_copy(uri: str, settings: Settings) -> Iterator[Path]:
    """A local path holding the content of ``uri``: the path itself, or a temporary download."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="fraud-") as tmp:
        yield download(uri, Path(tmp) / Path(split_s3(uri)[1]).name, settings)


@_s3_errors
def delete(uri: str, settings: Settings) -> None:
    """Remove a file, folder or every object under a prefix; missing is fine."""
    if not is_s3(uri):
        path = Path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    client = s3_client(settings)
    for obj in client.list_objects(bucket, prefix=key, recursive=True):
        client.remove_object(bucket, obj.object_name)
