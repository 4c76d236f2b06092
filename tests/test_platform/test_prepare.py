"""Ray Data prepare: bad rows are recorded with row, path and reason; the others are written."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlp3d.config import load_config
from vlp3d.data.phantom import synthesize


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    cases = synthesize(root, 10, seed=5, workers=1)
    paths = {name: next(root.rglob(f"{name}.nii.gz")) for name in cases.VolumeName}
    names = list(cases.VolumeName)
    truncated, missing, nan_volume, empty_report = names[:4]
    data = paths[truncated].read_bytes()
    paths[truncated].write_bytes(data[: len(data) // 3])
    paths[missing].unlink()
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, dtype=np.float32), np.eye(4)), paths[nan_volume])
    for csv in (root / "radiology_text_reports").glob("*.csv"):
        table = pd.read_csv(csv)
        table.loc[table.VolumeName == f"{empty_report}.nii.gz", ["Findings_EN", "Impressions_EN"]] = ""
        table.to_csv(csv, index=False)
    return root, {"truncated": truncated, "missing": missing, "nan": nan_volume, "empty": empty_report}


def test_bad_rows_recorded_and_rest_written(ray_session, broken_corpus, tmp_path):
    from vlp3d.platform.prepare import prepare

    root, bad = broken_corpus
    cfg = load_config(None, ["data.shape=[32, 32, 32]", "data.spacing_mm=[12.0, 12.0, 12.0]"])
    result = prepare(cfg, str(root), str(tmp_path / "shards"), progress=lambda *_: None)
    manifest = json.loads((result.shard_dir / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 10
    assert manifest["counts"]["written"] == 6 and manifest["counts"]["failed"] == 4
    reasons = {f["volume_name"].removesuffix(".nii.gz"): f["reason"] for f in manifest["failed"]}
    assert "not found" in reasons[bad["missing"]]
    assert "NaN" in reasons[bad["nan"]]
    assert "empty report" in reasons[bad["empty"]]
    assert bad["truncated"] in reasons  # gzip/EOF error text varies by library version
    assert all(f["path"].endswith(".nii.gz") and isinstance(f["row"], int) for f in manifest["failed"])
    table = pq.read_table(result.shard_dir, columns=["volume_name", "split", "image", "spec_hash",
                                                    "sentence_mask"]).to_pandas()
    # phantom impressions: one sentence per present finding, or one "no abnormality" sentence
    assert all(1 <= np.asarray(mask).sum() <= 6 for mask in table.sentence_mask)
    assert len(table) == 6 and not set(table.volume_name) & {f"{b}.nii.gz" for b in bad.values()}
    assert set(table.spec_hash) == {manifest["spec_hash"]} and result.shard_dir.name == manifest["spec_hash"]
    # a changed spec gets a new hash and a new folder
    other = prepare(load_config(None, ["data.shape=[24, 24, 24]", "data.spacing_mm=[16.0, 16.0, 16.0]"]),
                    str(root), str(tmp_path / "shards"), progress=lambda *_: None)
    assert other.shard_dir != result.shard_dir and other.shard_dir.parent == result.shard_dir.parent
