"""Prepare a corpus of CTs + 2D radiographs with high-resolution CT storage; resume after a kill."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlp3d.config import load_config
from vlp3d.data.phantom import synthesize
from vlp3d.data.shards import decode_image, shard_files

QUIET = {"progress": lambda *_: None}
CFG = ["data.storage=\"highres\"", "data.foreground_crop=true", "data.shape=[24, 24, 24]",
       "data.spacing_mm=[10.0, 10.0, 10.0]", "data.shape_2d=[32, 40]", "data.text_embeddings=false"]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """6 CTs + 6 radiographs (one not an image), prepared once with 2 rows per Parquet file."""
    from vlp3d.platform.prepare import prepare

    root = tmp_path_factory.mktemp("mixed")
    synthesize(root, 6, seed=7, workers=1, radiographs=True)
    broken = root / pd.read_csv(root / "radiographs.csv").image[1]
    broken.write_text("not an image, only named .png")
    out = tmp_path_factory.mktemp("shards")
    result = prepare(load_config(None, CFG), str(root), str(out), rows_per_file=2, **QUIET)
    return root, broken, out, result


def _rows(files, columns=("row", "modality")):
    return pq.read_table(files, columns=list(columns)).to_pandas()


def test_mixed_corpus_writes_one_folder_per_modality(prepared):
    root, broken, _, result = prepared
    counts = result.manifest["counts"]
    assert counts["rows"] == 12 and counts["by_modality"] == {"ct": 6, "xray": 5} and counts["failed"] == 1
    (failure,) = result.manifest["failed"]
    assert failure["row"] == 7 and failure["path"] == str(broken) and "not a PNG" in failure["reason"]
    ct, xray = shard_files(result.shard_dir, "ct"), shard_files(result.shard_dir, "xray")
    assert len(ct) == 3 and len(xray) == 3 and not set(ct) & set(xray)
    assert all(Path(f).parent == result.shard_dir for f in ct)
    assert all(Path(f).parent == result.shard_dir / "xray" for f in xray)
    assert set(_rows(ct).modality) == {"ct"} and set(_rows(xray).modality) == {"xray"}
    assert pq.read_schema(xray[0]).names == pq.read_schema(ct[0]).names  # same columns in both folders
    radiographs = _rows(xray, ["image", "image_shape", "patient_id", "split", "report", "fraction_rank"])
    assert all(np.asarray(image).shape == (32, 40) for image in radiographs.image)  # fixed 2D tensor
    assert all(np.asarray(shape).tolist() == [32, 40] for shape in radiographs.image_shape)
    volumes = _rows(ct, ["image", "image_shape", "patient_id", "split", "report", "fraction_rank"])
    for value, shape in zip(volumes.image, volumes.image_shape, strict=True):
        image = decode_image(value, shape, "float16")  # highres: bytes + shape
        assert image.shape == tuple(np.asarray(shape)) and (np.asarray(shape) >= 24).all()
    by_patient = volumes.set_index("patient_id")
    for row in radiographs.itertuples():  # a radiograph shares its CT's patient, split, report, rank
        same = by_patient.loc[[row.patient_id]]
        assert row.split == same.split.iloc[0] and row.fraction_rank == same.fraction_rank.iloc[0]
        assert row.report in set(same.report)


def test_resume_after_a_kill_writes_each_row_once(prepared, tmp_path):
    from vlp3d.platform.prepare import prepare

    root, _, out, result = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard_dir = copy / result.shard_dir.name
    assert prepare(load_config(None, CFG), str(root), str(copy), **QUIET).skipped  # finished: no-op
    files = shard_files(shard_dir, "ct")
    full = _rows(files, ["row", "image"]).set_index("row")

    # simulate a kill halfway: no manifest (the failure records still in _failed/), one file never
    # written, one cut off mid-write
    (failure,) = json.loads((shard_dir / "_manifest.json").read_text())["failed"]
    (shard_dir / "_failed").mkdir()
    (shard_dir / "_failed" / "row-00000007.json").write_text(json.dumps(failure))
    (shard_dir / "_manifest.json").unlink()
    lost = _rows([files[0]]).row.tolist()
    Path(files[0]).unlink()
    cut = _rows([files[1]]).row.tolist()
    data = Path(files[1]).read_bytes()
    Path(files[1]).write_bytes(data[: len(data) // 2])
    kept = {f: Path(f).stat().st_mtime_ns for f in [files[2], *shard_files(shard_dir, "xray")]}

    again = prepare(load_config(None, CFG), str(root), str(copy), rows_per_file=2, **QUIET)
    counts = again.manifest["counts"]
    assert again.shard_dir == shard_dir and not again.skipped
    assert counts["resumed"] == 12 - len(lost) - len(cut)  # written + failed rows kept
    assert counts["by_modality"] == {"ct": 6, "xray": 5} and counts["failed"] == 1
    rows = _rows(shard_files(shard_dir, "ct"), ["row", "image"])
    written = rows.row.tolist() + _rows(shard_files(shard_dir, "xray")).row.tolist()
    assert sorted(written) == [r for r in range(12) if r != 7]  # every row exactly once
    assert all(Path(f).stat().st_mtime_ns == t for f, t in kept.items())  # complete files untouched
    redone = rows.set_index("row")
    assert all(redone.image[r] == full.image[r] for r in lost + cut)  # same bytes as the first run

    manifest = json.loads((shard_dir / "_manifest.json").read_text())
    assert manifest["spec"]["storage"] == "highres" and [f["row"] for f in manifest["failed"]] == [7]
    assert prepare(load_config(None, CFG), str(root), str(copy), **QUIET).skipped
