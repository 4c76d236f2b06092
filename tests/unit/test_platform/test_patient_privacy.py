"""The leakage check under keyed fingerprints (no Ray, no trained run: a two-column shard folder and the
record a run would hold): the same key finds the overlap without naming a patient, another key is
refused with both keys' ids, an older unkeyed record is still checked (with a warning)."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlp3d.data.patients import KEY_ENV, PatientKeyError, ensure_patient_key, unkeyed_fingerprint
from vlp3d.platform import evaluate
from vlp3d.platform.evaluate import LeakageError, check_leakage

MRN = "8675309"


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """<root>/<hash>/ with patients 8675309 and 1111111 in 'valid', 2222222 in 'train', and the root's key."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    folder = tmp_path / "shards" / "0123abcd"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"split": ["valid", "valid", "train"], "patient_id": [MRN, "1111111", "2222222"]}),
                   folder / "part-0.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"spec_hash": "0123abcd", "source_manifest_hash": "s"}))
    return folder, ensure_patient_key(tmp_path / "shards")


def _check(monkeypatch, folder, record):
    monkeypatch.setattr(evaluate.runs, "pretraining_patients", lambda uri, run_id: record)
    embedder = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(train_split="train")))
    check_leakage("sqlite:///unused.db", "run-1", embedder, folder, "valid", {"source_manifest_hash": "s"})


def test_the_same_key_finds_the_overlap_and_names_no_patient(shards, monkeypatch):
    folder, key = shards
    record = {"split": "train", "key_id": key.key_id, "fingerprints": [key.fingerprint(MRN), key.fingerprint("9")]}
    with pytest.raises(LeakageError, match=r"1 of its 2 patients were in the model's pretraining data") as err:
        _check(monkeypatch, folder, record)
    assert MRN not in str(err.value) and "1111111" not in str(err.value)
    _check(monkeypatch, folder, {**record, "fingerprints": [key.fingerprint("2222222")]})  # no overlap: passes


def test_a_record_made_under_another_key_is_refused_with_both_ids(shards, monkeypatch, tmp_path):
    folder, key = shards
    other = ensure_patient_key(tmp_path / "elsewhere")
    record = {"split": "train", "key_id": other.key_id, "fingerprints": [other.fingerprint(MRN)]}
    with pytest.raises(PatientKeyError, match=rf"fingerprinted them with patient key {other.key_id}, and the key "
                                              rf"here .* is {key.key_id}\. Set VLP3D_PATIENT_KEY_FILE"):
        _check(monkeypatch, folder, record)
    # with the model's key shared, the check runs and finds the patient
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "elsewhere" / "_patient_key"))
    with pytest.raises(LeakageError, match="1 of its 2 patients"):
        _check(monkeypatch, folder, record)


def test_an_unkeyed_record_of_an_older_vlp3d_is_still_checked_with_a_warning(shards, monkeypatch):
    folder, _ = shards
    warnings = []
    monkeypatch.setattr(evaluate.logger, "warning", lambda message, *a, **k: warnings.append(message))
    record = {"split": "train", "fingerprints": [unkeyed_fingerprint(MRN)]}
    with pytest.raises(LeakageError, match="1 of its 2"):
        _check(monkeypatch, folder, record)
    assert len(warnings) == 1 and "unkeyed fingerprints" in warnings[0]
    assert "data/pretraining_patients.json" in warnings[0]
