"""Ray Data prepare: bad and non-CT rows are recorded with row, path and reason; the others are written."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlp3d.config import load_config
from vlp3d.data.phantom import LABEL_MAP_CLASSES, synthesize
from vlp3d.data.shards import decode_label_map


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    cases = synthesize(root, 10, seed=5, workers=1)
    paths = {name: next(root.rglob(f"{name}.nii.gz")) for name in cases.VolumeName}
    names = list(cases.VolumeName)
    truncated, missing, nan_volume, empty_report, mask, mr_like = names[:6]
    data = paths[truncated].read_bytes()
    paths[truncated].write_bytes(data[: len(data) // 3])
    paths[missing].unlink()
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, dtype=np.float32), np.eye(4)), paths[nan_volume])
    # a label mask ({0, 1, 2}) still listed with the CT rescale of the metadata CSV (intercept -1024)
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[6:18, 6:18, 6:18], labels[9:12, 9:12, 9:12] = 1, 2
    nib.save(nib.Nifti1Image(labels, np.diag([8.0, 8.0, 8.0, 1.0])), paths[mask])
    # MR-like: positive intensities only, no rescale anywhere (its metadata row has none)
    mr = np.random.default_rng(0).uniform(0, 900, (24, 24, 24)).astype(np.int16)
    nib.save(nib.Nifti1Image(mr, np.diag([8.0, 8.0, 8.0, 1.0])), paths[mr_like])
    for csv in (root / "radiology_text_reports").glob("*.csv"):
        table = pd.read_csv(csv)
        table.loc[table.VolumeName == f"{empty_report}.nii.gz", ["Findings_EN", "Impressions_EN"]] = ""
        table.to_csv(csv, index=False)
    for csv in root.rglob("*_metadata.csv"):
        table = pd.read_csv(csv)
        table.loc[table.VolumeName == f"{mr_like}.nii.gz", ["RescaleSlope", "RescaleIntercept"]] = np.nan
        table.to_csv(csv, index=False)
    # one row of a modality prepare does not read (row 10, after the CT rows)
    pd.DataFrame([{"image": "mr/brain.nii.gz", "modality": "MR", "source_volume": f"{names[6]}.nii.gz"}]).to_csv(
        root / "radiographs.csv", index=False)
    return root, {"truncated": truncated, "missing": missing, "nan": nan_volume, "empty": empty_report,
                  "mask": mask, "mr_like": mr_like}


def test_bad_rows_recorded_and_rest_written(ray_session, broken_corpus, tmp_path):
    from vlp3d.platform.prepare import failure_records, prepare

    root, bad = broken_corpus
    cfg = load_config(None, ["data.shape=[32, 32, 32]", "data.spacing_mm=[12.0, 12.0, 12.0]"])
    result = prepare(cfg, str(root), str(tmp_path / "shards"), progress=lambda *_: None)
    manifest = json.loads((result.shard_dir / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 11
    assert manifest["counts"]["written"] == 4 and manifest["counts"]["failed"] == 7
    # _failed/ (kept in the shard folder) names the files; the manifest (logged to MLflow) does not
    records = failure_records(result.shard_dir)
    assert [r["row"] for r in records] == [f["row"] for f in manifest["failed"]]
    assert all(set(f) == {"row", "reason"} for f in manifest["failed"])
    text = json.dumps(manifest)
    assert not any(name in text for name in bad.values()) and "brain.nii.gz" not in text
    reasons = {r["volume_name"].removesuffix(".nii.gz"): r["reason"] for r in records}
    assert "not found" in reasons[bad["missing"]]
    assert "NaN" in reasons[bad["nan"]]
    assert "empty report" in reasons[bad["empty"]]
    assert bad["truncated"] in reasons  # gzip/EOF error text varies by library version
    assert reasons[bad["mask"]].startswith("NotCTError") and "label mask" in reasons[bad["mask"]]
    assert "[0, 1, 2]" in reasons[bad["mask"]]
    assert "no value below 0 HU" in reasons[bad["mr_like"]]
    assert "modality 'MR' is not supported" in reasons["brain"]
    assert all(r["attempts"] == 1 for r in records)  # none of these errors is transient
    assert all(r["path"].endswith(".nii.gz") and isinstance(r["row"], int) for r in records)
    public = {f["row"]: f["reason"] for f in manifest["failed"]}
    missing_row = next(r["row"] for r in records if r["volume_name"] == f"{bad['missing']}.nii.gz")
    assert public[missing_row] == "FileNotFoundError: volume file not found: <image>"
    table = pq.read_table(result.shard_dir, columns=["volume_name", "split", "image", "spec_hash",
                                                    "sentence_mask"]).to_pandas()
    # phantom impressions: one sentence per present finding, or one "no abnormality" sentence
    assert all(1 <= np.asarray(mask).sum() <= 6 for mask in table.sentence_mask)
    assert len(table) == 4 and not set(table.volume_name) & {f"{b}.nii.gz" for b in bad.values()}
    assert set(table.spec_hash) == {manifest["spec_hash"]} and result.shard_dir.name == manifest["spec_hash"]
    assert not (result.shard_dir / "_prepare.lock").exists()  # released (removed) at the end
    # the phantom's voxel label maps ride along (nearest-neighbour, same transforms: tests/test_data/test_label_maps.py)
    assert manifest["label_maps"] == {"classes": list(LABEL_MAP_CLASSES), "rows": 10}
    maps = pq.read_table(result.shard_dir, columns=["label_map", "image_shape"]).to_pylist()
    assert all(decode_label_map(r["label_map"], r["image_shape"]).max() >= 3 for r in maps)  # heart = 3
    # a changed spec gets a new hash and a new folder
    other = prepare(load_config(None, ["data.shape=[24, 24, 24]", "data.spacing_mm=[16.0, 16.0, 16.0]"]),
                    str(root), str(tmp_path / "shards"), progress=lambda *_: None)
    assert other.shard_dir != result.shard_dir and other.shard_dir.parent == result.shard_dir.parent
