"""What the privacy scans look for, and the scan: patient data and a credential planted in the session's
tiny demo (a report sentence carrying an MRN and a DICOM UID; a token in every process's environment),
and every byte an MLflow store holds (database and artifacts) searched for them and for the corpus's
reports, volume names, file paths, the patient key and the unkeyed fingerprints of every patient.

Used by tests/e2e/test_fault_tolerance.py (the demo store and a server's store) and tests/e2e/test_sweep.py
(the store after a sweep); the tiny demo fixture (tests/conftest.py) plants the sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

PLANTED_MRN = "QX8675309"  # a medical record number (letters too: no metric value can spell it by chance)
PLANTED_UID = "1.2.840.113619.2.55.3.604688119.868.1700000000.42"
PLANTED_SENTENCE = f"Prior study of patient {PLANTED_MRN} (series {PLANTED_UID}) reviewed for comparison."
CREDENTIAL_ENV = "VLP3D_TEST_API_TOKEN"
PLANTED_CREDENTIAL = "vlp3d-pl4nted-cr3dential-0042"


def plant_in_corpus(corpus: Path) -> None:
    """The planted sentence at the end of the first training report's findings (same corpus every session)."""
    import pandas as pd

    path = corpus / "radiology_text_reports" / "train_reports.csv"
    table = pd.read_csv(path)
    table.loc[0, "Findings_EN"] = f"{table.loc[0, 'Findings_EN']} {PLANTED_SENTENCE}"
    table.to_csv(path, index=False)


def demo_needles(workdir: Path) -> set[str]:
    """Everything of the demo's patients no MLflow store may hold (whole reports, and the planted sentence
    on its own: the phantom's other sentences are templates that prompts may repeat)."""
    import pandas as pd

    from vlp3d.data.corpus import read_ctrate
    from vlp3d.data.patients import unkeyed_fingerprint

    corpus = workdir / "corpus"
    reports = pd.concat(pd.read_csv(p) for p in (corpus / "radiology_text_reports").glob("*.csv"))
    texts = set(reports["Findings_EN"].dropna()) | set(reports["Impressions_EN"].dropna())
    needles = {PLANTED_MRN, PLANTED_UID, PLANTED_SENTENCE, PLANTED_CREDENTIAL, str(corpus), str(workdir / "shards")}
    needles |= texts | set(reports["VolumeName"])
    needles |= {unkeyed_fingerprint(p) for p in read_ctrate(corpus)["patient_id"]}  # brute-forceable before
    needles.add((workdir / "shards" / "_patient_key").read_text().strip())  # the key itself
    assert any(PLANTED_SENTENCE in t for t in texts), "the tiny demo's corpus lacks the planted sentence"
    return needles


def store_files(*roots: Path) -> list[Path]:
    """Every file of an MLflow store (its database and artifact folders), the server's log aside."""
    return [p for root in roots for p in Path(root).rglob("*") if p.is_file() and p.name != "server.log"]


def assert_nothing_leaked(files: list[Path], needles: set[str]) -> int:
    """Search every byte of `files` for every needle; vlp3d's own source inside a logged model (its
    code_paths) must equal the package byte for byte instead (the phantom's report templates are in
    it). Returns the number of files scanned."""
    import vlp3d

    package = Path(vlp3d.__file__).parent
    pattern = re.compile(b"|".join(re.escape(n.encode()) for n in sorted(needles, key=len, reverse=True)))
    for path in files:
        data = path.read_bytes()
        if "code" in path.parts and "vlp3d" in path.parts[path.parts.index("code"):]:
            relative = path.parts[path.parts.index("code") + 2:]
            assert data == package.joinpath(*relative).read_bytes(), path
            continue
        found = pattern.search(data)
        assert found is None, f"{found.group(0)[:60]!r} found in {path}"
    return len(files)
