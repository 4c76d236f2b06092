import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vlp3d.data.corpus import read_ctrate
from vlp3d.data.labels import PHANTOM_FINDINGS
from vlp3d.data.phantom import synthesize
from vlp3d.data.report import split_sentences


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    cases = synthesize(root, 16, seed=3)
    return root, cases


def test_same_seed_gives_byte_identical_corpus(corpus, tmp_path):
    root, _ = corpus
    synthesize(tmp_path / "again", 16, seed=3)
    assert _digest(root) == _digest(tmp_path / "again")
    synthesize(tmp_path / "other", 16, seed=4)
    assert _digest(root) != _digest(tmp_path / "other")


def test_layout_and_columns_match_ctrate(corpus):
    root, cases = corpus
    reports = pd.read_csv(root / "radiology_text_reports" / "train_reports.csv")
    assert list(reports.columns) == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    labels = pd.read_csv(root / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert len(labels.columns) == 19 and labels.columns[0] == "VolumeName"
    meta = pd.read_csv(root / "metadata" / "train_metadata.csv")
    assert {"RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"} <= set(meta.columns)
    name = cases.VolumeName[0]
    patient, scan = "_".join(name.split("_")[:2]), name.rsplit("_", 1)[0]
    assert (root / cases.split[0] / patient / scan / f"{name}.nii.gz").is_file()


_PRESENT_CUES = {
    "Lung nodule": ("mm nodule is seen", "mm pulmonary nodule in", "nodule measuring"),
    "Pleural effusion": ("right pleural", "left pleural", "bilateral pleural"),
    "Cardiomegaly": ("heart is enlarged", "cardiomegaly is present", "consistent with cardiomegaly"),
    "Emphysema": ("emphysematous changes are seen", "emphysema with bullae", "lungs show emphysema"),
    "Consolidation": ("consolidation is present", "area of consolidation", "a consolidation is seen"),
    "Pericardial effusion": ("there is a pericardial effusion", "pericardial effusion is noted", "fluid is seen in the pericardial"),
}


def test_each_report_states_exactly_its_labels(corpus):
    root, _ = corpus
    table = read_ctrate(root)
    assert len(table) == 16
    for row in table.to_dict("records"):
        findings = row["Findings_EN"].lower()
        for name in PHANTOM_FINDINGS:
            stated = any(cue in findings for cue in _PRESENT_CUES[name])
            assert stated == bool(row[name]), (row["VolumeName"], name, row["Findings_EN"])
        # one sentence per finding plus two framing sentences
        assert len(split_sentences(row["Findings_EN"])) == len(PHANTOM_FINDINGS) + 2


def test_phrasing_varies_and_splits_are_by_patient(corpus):
    root, _ = corpus
    table = read_ctrate(root)
    absent_nodule = {s for r in table["Findings_EN"] for s in split_sentences(r) if "nodule" in s and "No" in s or "no lung nodule" in s}
    assert len(absent_nodule) >= 2
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert set(table.split) == {"train", "valid"}


def test_phantom_volumes_pass_the_not_ct_rule(corpus):
    """Every storage variant (header / metadata rescale, already HU) loads as CT in HU."""
    from vlp3d.data.corpus import metadata_scaling
    from vlp3d.data.hounsfield import not_ct_reason
    from vlp3d.data.volume import load_volume_hu

    root, cases = corpus
    table = read_ctrate(root)
    assert set(cases.storage) == {"header", "metadata", "hu"}
    for row in table.to_dict("records"):
        hu, _, decision = load_volume_hu(row["image"], metadata_scaling(row))
        assert not_ct_reason(hu, decision) is None, row["VolumeName"]


def test_storage_variants_and_orientations_present(tmp_path):
    cases = synthesize(tmp_path, 40, seed=0)
    assert set(cases.storage) == {"header", "metadata", "hu"}
    assert cases.orientation.nunique() >= 3
    img = nib.load(next(tmp_path.rglob("*.nii.gz")))
    assert img.get_data_dtype() == np.int16
