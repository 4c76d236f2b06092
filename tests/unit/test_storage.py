"""Output locations on pyarrow filesystem URIs (vlp3d.storage): a local `file://` URI and `s3://` on
an S3-compatible server (moto_server, the `s3_server` fixture). No Ray here; the platform test
tests/e2e/test_storage_uri.py prepares, trains, resumes and evaluates on them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlp3d import storage
from vlp3d.config import ConfigError, load_config
from vlp3d.data.shards import MANIFEST, count_rows, read_manifest, resolve_shard_dir, shard_files
from vlp3d.platform.runtime import checkpoint_location, run_storage, storage_location


@pytest.fixture(params=["file", "s3"])
def remote_root(request, tmp_path) -> str:
    """An empty folder behind a URI: file:///... or s3://vlp3d-test/<unique prefix>."""
    if request.param == "file":
        return (tmp_path / "remote").as_uri()
    return f"{request.getfixturevalue('s3_server')}/{uuid.uuid4().hex[:8]}"


def _shard_folder(folder: Path) -> dict:
    """A small shard folder as prepare lays it out: CT and xray Parquet files, a manifest."""
    (folder / "xray").mkdir(parents=True)
    rows = {"split": ["train", "train", "valid", "train"], "fraction_rank": [0.1, 0.7, 0.2, 0.4],
            "patient_id": ["p1", "p2", "p3", "p4"]}
    pq.write_table(pa.table(rows), folder / "part-0.parquet")
    pq.write_table(pa.table({"split": ["train"], "fraction_rank": [0.3], "patient_id": ["p5"]}),
                   folder / "part-1.parquet")
    pq.write_table(pa.table({"split": ["train"], "fraction_rank": [0.5], "patient_id": ["p1"]}),
                   folder / "xray" / "part-0.parquet")
    manifest = {"spec_hash": folder.name, "counts": {"written": 6}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_shards_on_a_uri_are_found_listed_and_counted_like_local_ones(tmp_path, remote_root):
    local = tmp_path / "local" / "abc123"
    manifest = _shard_folder(local)
    order = []
    storage.upload(local, storage.join(remote_root, "abc123"), last=(MANIFEST,),
                   on_file=lambda p: order.append(p.relative_to(local).as_posix()))
    assert order[-1] == MANIFEST and sorted(order) == ["_manifest.json", "part-0.parquet", "part-1.parquet",
                                                         "xray/part-0.parquet"]

    shard_dir = resolve_shard_dir(remote_root, "abc123")
    assert shard_dir == f"{remote_root}/abc123"
    assert resolve_shard_dir(remote_root) == shard_dir  # the only prepared folder there
    assert resolve_shard_dir(shard_dir) == shard_dir  # the folder itself
    assert read_manifest(shard_dir) == manifest
    assert shard_files(shard_dir, "ct") == [f"{shard_dir}/part-0.parquet", f"{shard_dir}/part-1.parquet"]
    assert shard_files(shard_dir, "xray") == [f"{shard_dir}/xray/part-0.parquet"]
    for fraction in (1.0, 0.5):
        assert count_rows(shard_dir, "train", fraction) == count_rows(local, "train", fraction)
    assert count_rows(shard_dir, "train", 0.5) == 3
    sizes = storage.file_sizes(shard_files(shard_dir, "ct"))
    assert sizes == [Path(f).stat().st_size for f in shard_files(local, "ct")]

    with storage.local_folder(shard_dir) as copy:
        assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == sorted(order)
        assert json.loads((copy / MANIFEST).read_text()) == manifest

    with pytest.raises(FileNotFoundError, match="found preprocessing hashes \\['abc123'\\]"):
        resolve_shard_dir(remote_root, "other")
    with pytest.raises(FileNotFoundError, match="found no prepared shards"):
        resolve_shard_dir(storage.join(remote_root, "empty"), "abc123")


def test_ray_train_storage_is_tracking_storage_a_folder_or_a_uri(tmp_path, s3_server):
    cfg = load_config(None, [f"tracking.workdir={tmp_path / 'work'}"])
    assert storage_location(cfg) == str(tmp_path / "work" / "ray_results")  # the default, created
    assert (tmp_path / "work" / "ray_results").is_dir()

    cfg = load_config(None, [f"tracking.workdir={tmp_path / 'work'}", f"tracking.storage={s3_server}/runs/"])
    path, fs = run_storage(cfg)
    assert (path, fs.type_name) == ("vlp3d-test/runs", "s3")
    assert checkpoint_location(cfg, "vlp3d-test/runs/demo/checkpoint_0001") == f"{s3_server}/runs/demo/checkpoint_0001"

    shared = tmp_path / "shared"
    cfg = load_config(None, [f"tracking.storage={shared.as_uri()}"])
    path, fs = run_storage(cfg)
    assert (path, fs.type_name) == (str(shared), "local")
    assert checkpoint_location(cfg, f"{shared}/demo/checkpoint_0001") == f"{shared.as_uri()}/demo/checkpoint_0001"


def test_a_uri_where_it_cannot_work_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="tracking.workdir = 's3://bucket/runs' must be a local folder.*"
                                          "tracking.storage=URI"):
        load_config(None, ["tracking.workdir=s3://bucket/runs"])
    with pytest.raises(ConfigError, match="data.corpus = 's3://bucket/ct-rate' must be a local folder.*mount"):
        load_config(None, ["data.corpus=s3://bucket/ct-rate"])
    with pytest.raises(ConfigError, match="data.shards = 'nosuchfs://bucket/shards': pyarrow cannot open"):
        resolve_shard_dir("nosuchfs://bucket/shards")
    cfg = load_config(None, ["tracking.storage=nosuchfs://bucket/runs"])
    with pytest.raises(ConfigError, match="tracking.storage = 'nosuchfs://bucket/runs': pyarrow cannot open"):
        run_storage(cfg)


def test_local_paths_stay_paths():
    assert not storage.is_uri("/data/shards") and not storage.is_uri("C:/data") and not storage.is_uri(Path("x"))
    assert storage.is_uri("s3://b/x") and storage.is_uri("file:///x") and storage.is_uri("gs://b")
    assert storage.join("/data/shards", "abc") == Path("/data/shards/abc")
    assert storage.join("s3://b/shards/", "abc", "xray") == "s3://b/shards/abc/xray"
    assert storage.name("s3://b/shards/abc/") == "abc" and storage.name(Path("/x/abc")) == "abc"
