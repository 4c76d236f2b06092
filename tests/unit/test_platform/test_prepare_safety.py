"""prepare's safety rules without a Ray pipeline: atomic status files, the folder lock (two real
processes), never deleting finished shards, bounded retries, and the rows-accounting check.

Corpora here hold rows that fail before Ray (modalities prepare does not read), or the pipeline
is replaced, so no test starts Ray. Real pipelines (a SIGKILLed run, non-CT volumes) are in
test_prepare.py and test_prepare_modalities.py.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vlp3d.config import load_config
from vlp3d.data.files import FolderLock, FolderLockedError, remove_temporaries, write_json_atomic
from vlp3d.data.shards import spec_from_config
from vlp3d.data.volume import PreprocessSpec

REPO = Path(__file__).resolve().parents[3]
QUIET = {"progress": lambda *_: None}


def _corpus(tmp_path: Path, modalities: list[str], name: str = "corpus.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame({"image": [f"vol/{i}.nii.gz" for i in range(len(modalities))],
                  "report": ["No acute abnormality."] * len(modalities),
                  "modality": modalities}).to_csv(path, index=False)
    return path


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in folder.rglob("*")}


# ---------------------------------------------------------------- atomic status files

def test_write_json_atomic_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "_manifest.json"
    write_json_atomic(path, {"rows": []})
    stop, errors = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as err:  # a plain write_text: often empty or cut off here
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(10):  # a plain write_text here: thousands of failed reads
            write_json_atomic(path, {"rows": list(range(20000)), "i": i}, indent=2)
    finally:
        stop.set()
        reader.join()
    assert errors == [] and json.loads(path.read_text())["i"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]  # no temporary left


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "_prepare.json"
    write_json_atomic(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"version": object()})  # not serialisable: nothing written
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "disk gone")))
        with pytest.raises(OSError, match="disk gone"):
            write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["_prepare.json"]
    (tmp_path / "._prepare.json.123-abcd.tmp").write_text('{"vers')  # left by a killed writer
    assert remove_temporaries(tmp_path) == 1 and [p.name for p in tmp_path.iterdir()] == ["_prepare.json"]


# ---------------------------------------------------------------- the folder lock

_HOLDER = """
import sys, time
from vlp3d.data.files import FolderLock
FolderLock(sys.argv[1], "prepare").acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_second_prepare_into_a_locked_folder_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path):
    """The first prepare is a second process holding the folder's lock (as prepare does for a whole
    run); the second, in this process, fails before touching the folder. After the holder is
    SIGKILLed its lock file stays, but the kernel released the lock: it is taken over."""
    from vlp3d.platform.prepare import LOCK, prepare

    cfg = load_config(None)
    shard_dir = tmp_path / "shards" / spec_from_config(cfg).hash
    shard_dir.mkdir(parents=True)
    lock = shard_dir / LOCK
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError) as raised:
            prepare(cfg, str(_corpus(tmp_path, ["MR"])), str(tmp_path / "shards"), **QUIET)
        message = str(raised.value)
        for part in (str(shard_dir), str(lock), f"PID {holder.pid}", socket.gethostname(), "Wait", "delete"):
            assert part in message, part
        assert sorted(p.name for p in shard_dir.iterdir()) == [LOCK]  # nothing else written
        with pytest.raises(FolderLockedError):  # flock: a second open file conflicts in any process
            FolderLock(lock).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind
    warnings = []
    with FolderLock(lock, "prepare", warn=warnings.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"PID {holder.pid}" in warnings[0] and "no longer running" in warnings[0]
    assert not lock.exists()  # released and removed


# ---------------------------------------------------------------- finished folders are kept

def test_changed_corpus_into_its_finished_folder_raises_and_keeps_it(tmp_path):
    from vlp3d.platform.prepare import PrepareError, failure_records, prepare

    cfg = load_config(None)
    corpus, out = _corpus(tmp_path, ["MR", "PT"]), str(tmp_path / "shards")
    first = prepare(cfg, str(corpus), out, **QUIET)  # both rows fail before Ray: a finished folder
    counts = first.manifest["counts"]
    assert (counts["rows"], counts["written"], counts["failed"]) == (2, 0, 2)
    assert first.manifest["failed"] == [{"row": r["row"], "reason": r["reason"]} for r in failure_records(first.shard_dir)]
    assert "modality 'MR' is not supported" in first.manifest["failed"][0]["reason"]
    assert prepare(cfg, str(corpus), out, **QUIET).skipped
    before = _snapshot(first.shard_dir)
    _corpus(tmp_path, ["MR", "PT", "US"])  # the same file, one row more: another source
    with pytest.raises(PrepareError) as raised:
        prepare(cfg, str(corpus), out, **QUIET)
    message = str(raised.value)
    assert str(first.shard_dir) in message and "changed since" in message and "another --out" in message
    assert first.manifest["source_manifest_hash"] in message
    assert _snapshot(first.shard_dir) == before


# ---------------------------------------------------------------- rows accounting

def test_rows_neither_written_nor_failed_stop_the_manifest_and_a_rerun_resumes_them(tmp_path, monkeypatch):
    import vlp3d.platform.prepare as p

    cfg, corpus, out = load_config(None), _corpus(tmp_path, ["CT"] * 12), str(tmp_path / "shards")
    monkeypatch.setattr(p, "init_ray", lambda cfg: None)

    def loses_rows(ray, cfg, spec, rows, label_names, failed_dir, target, rows_per_file):
        p._record_failure(failed_dir, rows[0], "ValueError: recorded")  # every other row vanishes

    monkeypatch.setattr(p, "_run_pipeline", loses_rows)
    with pytest.raises(p.PrepareError) as raised:
        p.prepare(cfg, str(corpus), out, **QUIET)
    message = str(raised.value)
    assert "12 input rows, 0 written + 1 failed" in message
    assert f"11 rows neither written nor recorded as failed (first: {list(range(1, 11))})" in message
    shard_dir = Path(out).resolve() / spec_from_config(cfg).hash
    assert not (shard_dir / p.MANIFEST).exists() and not (shard_dir / p.LOCK).exists()

    seen = []

    def records_all(ray, cfg, spec, rows, label_names, failed_dir, target, rows_per_file):
        seen.extend(row["row"] for row in rows)
        for row in rows:
            p._record_failure(failed_dir, row, "ValueError: recorded")

    monkeypatch.setattr(p, "_run_pipeline", records_all)
    result = p.prepare(cfg, str(corpus), out, **QUIET)
    assert seen == list(range(1, 12)) and result.manifest["counts"]["resumed"] == 1
    assert result.manifest["counts"]["failed"] == 12


def test_accounting_names_unexpected_and_double_rows(tmp_path):
    from vlp3d.platform.prepare import PrepareError, _check_accounting

    _check_accounting(tmp_path, 3, {0, 2}, {1})
    with pytest.raises(PrepareError, match=r"1 row ids not in the corpus \(first: \[5\]\).*1 rows both written"):
        _check_accounting(tmp_path, 3, {0, 1, 2, 5}, {1})


# ---------------------------------------------------------------- bounded retries

def test_transient_read_errors_are_retried_and_permanent_ones_are_not():
    from vlp3d.platform.prepare import READ_ATTEMPTS, RowFailed, call_with_retries, is_transient

    for err in (OSError(errno.EIO, "Input/output error"), OSError(errno.ESTALE, "Stale file handle"),
                TimeoutError("read timed out"), ConnectionResetError(errno.ECONNRESET, "reset")):
        assert is_transient(err), err
    for err in (FileNotFoundError(errno.ENOENT, "No such file"), PermissionError(errno.EACCES, "denied"),
                IsADirectoryError(errno.EISDIR, "dir"), gzip.BadGzipFile("Not a gzipped file"),
                OSError("image file is truncated"), EOFError("compressed file ended"), ValueError("NaN")):
        assert not is_transient(err), err

    sleeps, outcomes = [], [OSError(errno.EIO, "Input/output error"), TimeoutError("timed out"), "volume"]

    def flaky():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert call_with_retries(flaky, sleep=sleeps.append) == "volume" and sleeps == [0.5, 1.0]
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    with pytest.raises(RowFailed) as failed:
        call_with_retries(missing, sleep=sleeps.append)
    assert len(calls) == 1 and failed.value.attempts == 1 and "attempts" not in failed.value.reason

    def broken_mount():
        calls.append(1)
        raise OSError(errno.EIO, "Input/output error")

    calls.clear()
    with pytest.raises(RowFailed) as failed:
        call_with_retries(broken_mount, sleep=lambda s: None)
    assert len(calls) == failed.value.attempts == READ_ATTEMPTS == 3
    assert failed.value.reason == "OSError: [Errno 5] Input/output error (after 3 attempts)"


def test_preprocess_batch_retries_a_flaky_read_and_records_failures_with_attempts(tmp_path, monkeypatch):
    """The Ray Data UDF itself, called here: a row failing twice with EIO is written, a missing
    file fails at once, a row failing every attempt is recorded with its attempts."""
    import vlp3d.platform.prepare as p

    hu = np.full((20, 20, 20), -1000, dtype=np.int16)
    hu[5:15, 5:15, 5:15] = 40
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.0, 1.0])), good)
    images = [good, tmp_path / "missing.nii.gz", good]
    rows = [{"row": i, "image": str(path), "VolumeName": path.name, "patient_id": f"p{i}", "split": "train",
             "fraction_rank": 0.5, "Impressions_EN": "No acute abnormality.", "modality": "ct"}
            for i, path in enumerate(images)]
    batch = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    eio_left = {0: 2, 2: 100}
    real = p.preprocess_row

    def flaky(row, spec, label_names):
        if eio_left.get(row["row"], 0) > 0:
            eio_left[row["row"]] -= 1
            raise OSError(errno.EIO, "Input/output error", row["image"])
        return real(row, spec, label_names)

    monkeypatch.setattr(p, "preprocess_row", flaky)
    monkeypatch.setattr(p, "RETRY_BACKOFF_S", 0.0)
    failed_dir = tmp_path / p.FAILED_DIR
    failed_dir.mkdir()
    out = p._preprocess_batch(batch, PreprocessSpec(shape=(8, 8, 8), spacing_mm=(8.0, 8.0, 8.0)), [],
                              str(failed_dir))
    assert out["row"].tolist() == [0] and eio_left[0] == 0 and out["image"].shape == (1, 8, 8, 8)
    missing, broken = p.failure_records(tmp_path)
    assert (missing["row"], missing["attempts"]) == (1, 1) and "not found" in missing["reason"]
    assert (broken["row"], broken["attempts"]) == (2, 3) and broken["reason"].endswith("(after 3 attempts)")
    assert eio_left[2] == 100 - 3
    assert str(good) in broken["reason"] and str(good) not in p._public_reason(broken)
    assert p._public_reason(broken) == "OSError: [Errno 5] Input/output error: '<image>' (after 3 attempts)"


def test_a_dicom_folders_reason_reaches_the_manifest_without_its_series_uids():
    """A folder of two series fails with their SeriesInstanceUIDs in the reason (vlp3d.data.dicom): the
    manifest, logged to MLflow with every run, keeps the reason's sense without the UIDs or the folder."""
    import vlp3d.platform.prepare as p

    folder = "/data/dicom/QX8675309/CT_1"
    record = {"row": 4, "path": folder, "volume_name": "CT_1",
              "reason": f"ValueError: {folder}: holds 2 series (1.2.840.113619.2.55.3.604688119.868.1, "
                        "1.2.840.113619.2.55.3.604688119.868.2); put one series per folder"}
    assert p._public_reason(record) == "ValueError: <image>: holds 2 series (<uid>, <uid>); put one series per folder"
