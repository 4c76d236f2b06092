"""Prepare a corpus of CTs + 2D radiographs with high-resolution CT storage; resume after a kill
(simulated, and a real SIGKILL); a finished folder is never deleted, an unfinished one of another
source is cleared."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
    from vlp3d.platform.prepare import failure_records

    root, broken, _, result = prepared
    counts = result.manifest["counts"]
    assert counts["rows"] == 12 and counts["by_modality"] == {"ct": 6, "xray": 5} and counts["failed"] == 1
    (failure,) = result.manifest["failed"]
    assert set(failure) == {"row", "reason"} and failure["row"] == 7 and "not a PNG" in failure["reason"]
    (record,) = failure_records(result.shard_dir)  # kept in the folder, with the path
    assert record["row"] == 7 and record["path"] == str(broken) and record["attempts"] == 1
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
    from vlp3d.platform.prepare import failure_records, prepare

    root, _, out, result = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard_dir = copy / result.shard_dir.name
    assert prepare(load_config(None, CFG), str(root), str(copy), **QUIET).skipped  # finished: no-op
    files = shard_files(shard_dir, "ct")
    full = _rows(files, ["row", "image"]).set_index("row")

    # simulate a kill halfway: no manifest (the failure records in _failed/), one file never
    # written, one cut off mid-write
    assert [r["row"] for r in failure_records(shard_dir)] == [7]
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


_KILLED_CHILD = """
import json, os, signal, sys, threading, time
from pathlib import Path
from vlp3d.config import load_config
from vlp3d.platform import prepare as p

root, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
real = p._run_pipeline

def killed_once_a_file_appears(ray, cfg, spec, rows, label_names, failed_dir, target, rows_per_file):
    def watch():
        while not any(Path(target).glob("*.parquet")):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: CT files (some or all) written, no xray, lock held
    threading.Thread(target=watch, daemon=True).start()
    real(ray, cfg, spec, rows, label_names, failed_dir, target, rows_per_file)
    time.sleep(120)  # the watcher kills this process before it gets further

p._run_pipeline = killed_once_a_file_appears
p.prepare(load_config(None, overrides), root, out, rows_per_file=2)
"""


def test_sigkilled_prepare_reruns_to_each_row_once(prepared, ray_session, tmp_path):
    """A prepare process SIGKILLed once its first CT Parquet file appears, before the radiograph
    pipeline and the manifest (it joins the session's Ray, starting none): the rerun takes over its
    lock with a warning and writes every row once. Cut-off files: the simulated kill above."""
    from vlp3d.platform.prepare import prepare

    root, _, _, result = prepared
    ray = ray_session
    out = tmp_path / "shards"
    shard_dir = out / result.shard_dir.name
    free_cpus = ray.available_resources().get("CPU", 0)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(root), str(out), json.dumps(CFG)],
                           env=env, capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-2000:]
    assert not (shard_dir / "_manifest.json").exists() and any(shard_dir.glob("*.parquet"))
    assert shard_files(shard_dir, "xray") == []
    holder = json.loads((shard_dir / "_prepare.lock").read_text())  # left behind by the dead process
    # the dead driver's job: Ray ends its workers; wait until their CPUs are back (no stray writer)
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < free_cpus and time.time() < deadline:
        time.sleep(0.2)

    messages = []
    again = prepare(load_config(None, CFG), str(root), str(out), rows_per_file=2, progress=messages.append)
    takeover = [m for m in messages if "taking over" in m]
    assert len(takeover) == 1 and f"PID {holder['pid']}" in takeover[0] and "no longer running" in takeover[0]
    counts = again.manifest["counts"]
    assert counts["rows"] == 12 and counts["by_modality"] == {"ct": 6, "xray": 5} and counts["failed"] == 1
    ct = _rows(shard_files(shard_dir, "ct"), ["row", "image"])
    written = ct.row.tolist() + _rows(shard_files(shard_dir, "xray")).row.tolist()
    assert sorted(written) == [r for r in range(12) if r != 7]  # every row exactly once
    first = _rows(shard_files(result.shard_dir, "ct"), ["row", "image"]).set_index("row")
    assert all(first.image[r] == image for r, image in zip(ct.row, ct.image, strict=True))
    assert not (shard_dir / "_prepare.lock").exists()


def _other_corpus(tmp_path) -> Path:
    """A manifest whose rows all fail before Ray (modalities prepare does not read)."""
    path = tmp_path / "other.csv"
    pd.DataFrame({"image": ["mr/a.nii.gz", "pet/b.nii.gz"], "report": ["Normal.", "Normal."],
                  "modality": ["MR", "PT"]}).to_csv(path, index=False)
    return path


def test_finished_folder_is_never_deleted_for_another_corpus(prepared, tmp_path):
    from vlp3d.platform.prepare import PrepareError, prepare

    root, _, out, result = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard_dir = copy / result.shard_dir.name
    before = {p: p.stat().st_mtime_ns for p in shard_dir.rglob("*")}
    other = _other_corpus(tmp_path)
    with pytest.raises(PrepareError) as raised:
        prepare(load_config(None, CFG), str(other), str(copy), **QUIET)
    message = str(raised.value)
    assert str(shard_dir) in message and str(Path(root).resolve()) in message and str(other.resolve()) in message
    assert result.manifest["source_manifest_hash"] in message and "another --out" in message
    assert "delete" in message
    assert {p: p.stat().st_mtime_ns for p in shard_dir.rglob("*")} == before  # nothing touched


def test_unfinished_folder_of_another_source_is_cleared(prepared, tmp_path):
    from vlp3d.platform.prepare import failure_records, prepare

    _, _, out, result = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard_dir = copy / result.shard_dir.name
    (shard_dir / "_manifest.json").unlink()  # an interrupted run of the mixed corpus
    messages = []
    again = prepare(load_config(None, CFG), str(_other_corpus(tmp_path)), str(copy), progress=messages.append)
    assert any(m.startswith("clearing") for m in messages)
    assert shard_files(shard_dir, "ct") == [] and shard_files(shard_dir, "xray") == []
    counts = again.manifest["counts"]
    assert (counts["rows"], counts["written"], counts["failed"]) == (2, 0, 2)
    assert [f["reason"] for f in again.manifest["failed"]] == [
        r["reason"] for r in failure_records(shard_dir)]  # no path in these reasons
    assert all("is not supported" in f["reason"] for f in again.manifest["failed"])
