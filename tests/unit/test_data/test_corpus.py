import numpy as np
import pandas as pd
import pytest

from vlp3d.data.corpus import CorpusError, fraction_ranks, read_corpus, read_generic_manifest
from vlp3d.data.report import report_text


def _table(n_patients=400, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _scan in range(1 + (p % 3 == 0)):
            rows.append({"patient_id": f"p{p}", "split": "valid" if p % 5 == 0 else "train",
                         "rare": int(rng.random() < 0.05), "common": int(rng.random() < 0.4)})
    return pd.DataFrame(rows)


def test_fractions_are_nested_and_patient_level():
    table = _table()
    ranks = fraction_ranks(table, ["rare", "common"])
    kept = {f: set(table.patient_id[ranks < f]) for f in (0.25, 0.5, 1.0)}
    assert kept[0.25] < kept[0.5] < kept[1.0] == set(table.patient_id)
    # all scans of a patient share its rank
    assert table.assign(rank=ranks).groupby("patient_id")["rank"].nunique().max() == 1
    # deterministic
    np.testing.assert_array_equal(ranks, fraction_ranks(table, ["rare", "common"]))


def test_fractions_are_stratified_by_label():
    table = _table(2000)
    ranks = fraction_ranks(table, ["rare", "common"])
    patients = table.assign(rank=ranks).groupby("patient_id").agg(rare=("rare", "max"), rank=("rank", "first"))
    quarter = patients[patients["rank"] < 0.25]
    # the rare label keeps its share within one patient of exact stratification
    assert abs(quarter.rare.sum() - 0.25 * patients.rare.sum()) <= 1.5


def test_generic_manifest_csv_jsonl_parquet(tmp_path):
    frame = pd.DataFrame({"image": ["a/1.nii.gz", "/abs/2.nii.gz"], "report": ["Lungs clear.", "Effusion."],
                          "patient_id": ["x", "y"], "Pleural effusion": [0, 1], "age": [40, 70]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    frame.to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        table = read_corpus(tmp_path / name)
        assert table.attrs["label_names"] == ["Pleural effusion"]  # 'age' is not 0/1
        assert table.image[0] == str(tmp_path / "a/1.nii.gz") and table.image[1] == "/abs/2.nii.gz"
        assert set(table.split) <= {"train", "valid"}
        assert report_text(table.iloc[1].to_dict(), ("Findings_EN", "Impressions_EN"))[1] == ["Effusion."]


def test_generic_manifest_errors_name_the_file_and_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("path,text\nx,y\n")
    with pytest.raises(CorpusError, match=r"bad\.csv: missing column\(s\) \['image', 'report'\]"):
        read_generic_manifest(tmp_path / "bad.csv")
    (tmp_path / "leak.csv").write_text("image,report,patient_id,split\na,r,p1,train\nb,r,p1,valid\n")
    with pytest.raises(CorpusError, match="p1"):
        read_generic_manifest(tmp_path / "leak.csv")
    with pytest.raises(CorpusError, match="unsupported manifest type"):
        (tmp_path / "m.txt").write_text("x")
        read_corpus(tmp_path / "m.txt")
