"""Keyed patient fingerprints: the key beside the shards (created once, owner-only, shared by a file or
$VLP3D_PATIENT_KEY_FILE), and a store's fingerprints that no longer give up a 7-digit MRN."""

import stat
import threading

import pytest

from vlp3d.data.patients import (
    KEY_ENV,
    KEY_FILE,
    PatientKeyError,
    ensure_patient_key,
    patient_key,
    unkeyed_fingerprint,
)

MRN = "8675309"  # a 7-digit medical record number


@pytest.fixture(autouse=True)
def _no_shared_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def test_prepare_creates_one_owner_only_key_beside_the_shards(tmp_path):
    said = []
    key = ensure_patient_key(tmp_path / "shards", said.append)
    path = tmp_path / "shards" / KEY_FILE
    assert said == [f"patient key {path} created: keep it with the shards; collaborators preparing the same "
                    "patients need it (docs/security.md)"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    assert ensure_patient_key(tmp_path / "shards", said.append) == key and len(said) == 1  # created once, then read
    # every preprocessing hash's folder under the same --out reads the same key
    assert patient_key(tmp_path / "shards" / "0123abcd").key_id == key.key_id
    assert key.secret.hex() not in repr(key) and key.key_id in repr(key)
    assert ensure_patient_key(tmp_path / "other").key_id != key.key_id  # another project, another key


def test_concurrent_prepares_agree_on_one_key(tmp_path):
    keys = []
    said = []
    threads = [threading.Thread(target=lambda: keys.append(ensure_patient_key(tmp_path, said.append).secret))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(said) == 1  # one of them created it
    assert not list(tmp_path.glob(".*.tmp"))


def test_fingerprints_are_keyed_and_a_store_no_longer_gives_up_an_mrn(tmp_path):
    key = ensure_patient_key(tmp_path)
    stored = key.fingerprint(MRN)  # what data/pretraining_patients.json holds
    assert stored == key.fingerprint(MRN) and stored != key.fingerprint("8675308") and len(stored) == 20
    assert stored != unkeyed_fingerprint(MRN)
    # the attack on the unkeyed fingerprint of the issue: try every id (here 10^5 of the 10^7) and
    # compare; it finds the unkeyed one and nothing under the key
    candidates = [f"{n:07d}" for n in range(8_600_000, 8_700_000)]
    assert [c for c in candidates if unkeyed_fingerprint(c) == unkeyed_fingerprint(MRN)] == [MRN]
    assert [c for c in candidates if unkeyed_fingerprint(c) == stored] == []
    other = ensure_patient_key(tmp_path / "other")
    assert other.fingerprint(MRN) != stored  # an attacker's own key gives other values


def test_a_missing_key_says_how_to_get_one(tmp_path):
    (tmp_path / "shards" / "abc").mkdir(parents=True)
    with pytest.raises(PatientKeyError, match=rf"{tmp_path / 'shards'}: no patient key \({KEY_FILE}\) beside these "
                                              r"shards .*run `vlp3d prepare` again with --out .* or set "
                                              rf"{KEY_ENV}"):
        patient_key(tmp_path / "shards" / "abc")
    (tmp_path / "shards" / KEY_FILE).write_text("not hex\n")
    with pytest.raises(PatientKeyError, match="not a patient key"):
        patient_key(tmp_path / "shards" / "abc")


def test_collaborators_share_the_key_by_file(tmp_path, monkeypatch):
    ours = ensure_patient_key(tmp_path / "ours")
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "ours" / KEY_FILE))
    theirs = ensure_patient_key(tmp_path / "theirs")  # their prepare copies the shared key beside their shards
    assert theirs.secret == ours.secret
    monkeypatch.delenv(KEY_ENV)
    assert patient_key(tmp_path / "theirs" / "hash").fingerprint(MRN) == ours.fingerprint(MRN)
    # the variable wins over the key beside the shards, and a wrong path is named
    ensure_patient_key(tmp_path / "third")
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "ours" / KEY_FILE))
    assert patient_key(tmp_path / "third" / "hash").key_id == ours.key_id
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(PatientKeyError, match=rf"\${KEY_ENV} = .*missing.key: no such file"):
        patient_key(tmp_path / "third" / "hash")

