"""Local paths and `s3://` URIs behind one pyarrow filesystem.

Credentials come from the standard AWS chain (environment, shared files, instance profile); an
S3-compatible endpoint (MinIO, moto on 127.0.0.1) is named by `AWS_ENDPOINT_URL`, the variable boto3,
botocore and s3fs read too. Nothing here logs credentials.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage location cannot be used: missing bucket, missing path, refused credentials."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def _endpoint() -> tuple[str | None, str]:
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, "https"
    parsed = urlparse(url)
    if parsed.scheme and parsed.netloc:
        return parsed.netloc, parsed.scheme
    return url, "https"


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, scheme: str, region: str) -> pafs.S3FileSystem:
    kwargs = {"region": region}
    if endpoint:
        kwargs.update(endpoint_override=endpoint, scheme=scheme)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint, scheme = _endpoint()
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return _s3_filesystem(endpoint, scheme, region)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an `s3://bucket/key` URI.

    A local path is made absolute without following symbolic links: a file is known by the path it was
    listed under (its image id and split come from that path, never from a link's target)."""
    text = str(uri)
    if is_s3(text):
        return s3_filesystem(), text[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def absolute(uri: str | os.PathLike) -> str:
    """An s3:// URI as it is; a local path made absolute the way `resolve` makes it: what a process
    elsewhere (a Ray worker in its own working directory, on another node) can use."""
    text = str(uri)
    return text if is_s3(text) else resolve(text)[1]


def join(base: str | os.PathLike, *parts: str) -> str:
    text = str(base)
    if is_s3(text):
        return "/".join([text.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(text, *parts))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_readable(uri: str | os.PathLike, what: str = "path") -> None:
    """Raise StorageError with one clear line when `uri` cannot be read (missing bucket or path)."""
    fs, path = resolve(uri)
    if is_s3(uri):
        bucket = path.split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"{what} {uri}: cannot reach S3 bucket '{bucket}': {_short(exc)}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what} {uri}: S3 bucket '{bucket}' does not exist")
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{what} {uri}: cannot be read: {_short(exc)}") from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {uri} does not exist")


def check_writable(uri: str | os.PathLike, what: str = "output") -> None:
    """Local folders are created; for S3 the bucket must exist (creating buckets is not ours to do)."""
    if is_s3(uri):
        fs, path = resolve(uri)
        bucket = path.split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"{what} {uri}: cannot reach S3 bucket '{bucket}': {_short(exc)}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what} {uri}: S3 bucket '{bucket}' does not exist")
    else:
        Path(uri).mkdir(parents=True, exist_ok=True)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write whole: a local file appears atomically (tmp + rename); an S3 object only once complete."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_entries(uri: str | os.PathLike) -> list[tuple[str, str]]:
    """Everything directly under a folder, sorted, as (URI, kind): kind is "file", "dir", "broken_link"
    (a local link whose target does not exist) or "other" (a socket, a device). Links are listed under
    their own names; a link to a file is a "file", a link to a folder a "dir"."""
    fs, path = resolve(uri)
    out = []
    if isinstance(fs, pafs.LocalFileSystem):
        with os.scandir(path) as entries:
            for entry in entries:
                full = os.path.join(path, entry.name)
                if entry.is_symlink() and not os.path.exists(full):
                    kind = "broken_link"
                elif entry.is_dir():
                    kind = "dir"
                elif entry.is_file():
                    kind = "file"
                else:
                    kind = "other"
                out.append((full, kind))
        return sorted(out)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        kind = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "other")
        out.append((f"s3://{info.path}", kind))
    return sorted(out)


def list_files(uri: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files directly under a folder (sorted), as URIs of the same kind as `uri`."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if suffixes and not info.base_name.lower().endswith(suffixes):
            continue
        out.append(f"s3://{info.path}" if is_s3(uri) else info.path)
    return sorted(out)


def write_json(uri: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON at `uri` (local or s3://); numpy scalars and the like as floats."""
    write_bytes(uri, json.dumps(obj, indent=1, default=float).encode())
