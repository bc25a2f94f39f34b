"""Local paths and URIs alike: every job takes a folder or a URI pyarrow understands (s3://, gs://, ...)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from .config import InputError


def is_uri(location: str) -> bool:
    return "://" in str(location)


def filesystem_for(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI, or of a local path made absolute."""
    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def read_bytes(location: str | Path) -> bytes:
    """File bytes of a local path or of any URI pyarrow's filesystems read (s3://, gs://, file://, ...)."""
    location = str(location)
    if not location:
        raise InputError("image path is empty")
    if is_uri(location):
        filesystem, path = filesystem_for(location)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    return Path(location).read_bytes()


def parquet_files(folder: str | Path, prefix: str = "") -> list[Path]:
    """Sorted ``<prefix>*.parquet`` files of a local folder; [] when there are none or the folder does not
    exist (whether that is an error is the caller's to say: a shard split must have parts, a batch
    job's output folder starts empty)."""
    folder = Path(folder)
    return sorted(folder.glob(f"{prefix}*.parquet")) if folder.is_dir() else []
