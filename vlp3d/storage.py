"""Output locations: a local folder or a pyarrow filesystem URI (`s3://bucket/prefix`,
`gs://bucket/prefix`, `hdfs://...`, `file:///shared/...`), for shards (`data.shards`, `prepare
--out`) and Ray Train/Tune storage (`tracking.storage`: run state and checkpoints).

One place resolves a location to `(pyarrow filesystem, path)`: `pyarrow.fs.FileSystem.from_uri`,
which reads credentials the standard way (S3: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_SESSION_TOKEN`, `AWS_PROFILE`, an instance profile; `AWS_ENDPOINT_URL` for an S3-compatible
server; GCS: application default credentials). Locations never carry secrets. Local paths keep
being plain `Path`s everywhere, so nothing changes for them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow.fs as pafs

# `is_uri` lives with the config, the bottom layer (it checks keys for URIs too); storage uses and re-exports it
from vlp3d.config import URI_SCHEME, ConfigError, is_uri
from vlp3d.redact import redact


def filesystem(location: str | Path, key: str = "") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI; a URI pyarrow cannot open is a ConfigError
    naming `key` (e.g. 'data.shards') when given."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError, TypeError) as err:  # ArrowInvalid is a ValueError
        where = f"{key} = " if key else ""
        raise ConfigError(redact(  # pyarrow's message repeats the URI, user-info and query included
            f"{where}{str(location)!r}: pyarrow cannot open this filesystem URI ({err}). Use a local folder or a "
            "URI such as s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path (credentials come "
            "from the environment, e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE / an instance profile, never the URI)."
        )) from None
    return fs, path.rstrip("/") or path


def uri_of(location: str, fs_path: str) -> str:
    """`fs_path` (a path on the filesystem of URI `location`, as Ray returns them) as a URI of
    the same scheme: s3://bucket/prefix + bucket/prefix/run/checkpoint -> s3://bucket/prefix/run/checkpoint."""
    scheme = URI_SCHEME.match(location).group(1)
    return f"{scheme}://{fs_path}" if scheme != "file" else Path(fs_path).as_uri()


def join(location: str | Path, *parts: str) -> str | Path:
    """`location/part/...`: a Path for a local folder, a URI string for a URI."""
    if not is_uri(location):
        return Path(location, *parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts if p)])


def name(location: str | Path) -> str:
    """The last part of a path or URI."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def _info(location: str | Path) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def is_file(location: str | Path) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    return _info(location).type == pafs.FileType.File


def read_text(location: str | Path) -> str:
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str | Path, text: str) -> None:
    """Write a small text file at a local path or a URI (the bucket's permissions apply to a URI)."""
    if not is_uri(location):
        Path(location).write_text(text)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def list_dir(location: str | Path) -> list[tuple[str | Path, bool]]:
    """(entry, is a folder) of the entries right under `location`, sorted; [] if it does not exist."""
    if not is_uri(location):
        folder = Path(location)
        return [(p, p.is_dir()) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [(join(location, i.base_name), i.type == pafs.FileType.Directory)
            for i in sorted(infos, key=lambda i: i.base_name)]


def files_with_suffix(location: str | Path, suffix: str) -> list[str]:
    """Files right under `location` whose names end with `suffix`, sorted, as strings (paths or URIs)."""
    return [str(entry) for entry, folder in list_dir(location) if not folder and name(entry).endswith(suffix)]


def file_sizes(files: Sequence[str]) -> list[int]:
    """Sizes in bytes of files (all local paths, or all URIs of one filesystem)."""
    fs, paths = for_reading(files)
    if fs is None:
        return [Path(f).stat().st_size for f in paths]
    return [int(i.size) for i in fs.get_file_info(paths)]


def for_reading(files: Sequence[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """(filesystem, paths) for pyarrow / Ray Data readers (`read_parquet(paths, filesystem=fs)`):
    local files as they are (filesystem None); URIs (of one filesystem) prefix-stripped, each
    folder resolved once (a shard folder holds thousands of files)."""
    if not files or not is_uri(files[0]):
        return None, list(files)
    fs, folders, paths = None, {}, []
    for file in files:
        folder, base = str(file).rsplit("/", 1)
        if folder not in folders:
            fs, folders[folder] = filesystem(folder)
        paths.append(f"{folders[folder]}/{base}")
    return fs, paths


def upload(local_dir: str | Path, location: str, last: Sequence[str] = (), skip: Sequence[str] = (),
           on_file: Callable[[Path], None] | None = None) -> None:
    """Copy the files under `local_dir` (but those whose relative paths are in `skip`) to
    `location`, the relative paths in `last` after all others: a reader that waits for a manifest
    never finds one before the files it describes. `on_file(path)` after each file (progress)."""
    fs, path = filesystem(location)
    local_dir = Path(local_dir)
    relative = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    relative = [r for r in relative if r not in skip and r not in last] + [r for r in last if r in relative]
    local = pafs.LocalFileSystem()
    for rel in relative:
        target = f"{path}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local_dir / rel), target, source_filesystem=local, destination_filesystem=fs)
        if on_file is not None:
            on_file(local_dir / rel)


def download(location: str, local_dir: str | Path) -> Path:
    """Copy the folder at URI `location` into `local_dir` (created); returns `local_dir`."""
    fs, path = filesystem(location)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(redact(f"{location}: no such folder"))
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def local_folder(location: str | Path) -> Iterator[Path]:
    """A local folder holding what `location` holds: the folder itself, or (a URI) a temporary
    download of it, deleted afterwards."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="vlp3d-download-") as tmp:
        yield download(str(location), tmp)
