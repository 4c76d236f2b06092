"""`vlp3d embed` in parts: a refused volume recorded without costing the others, a run stopped after
some parts resumed from them, and parts of other inputs never reused. (On Ray Data actors:
tests/e2e/test_embed.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

CHAMPION = "models:/vlp3d-clip@champion"


@pytest.fixture(scope="module")
def manifest(tiny_demo, tmp_path_factory):
    """The demo's validation volumes as CT-RATE lists them (raw files, rescale in the metadata CSV),
    with their reports, plus one file that is not a volume."""
    corpus = tiny_demo / "corpus"
    metadata = pd.read_csv(corpus / "metadata" / "validation_metadata.csv")
    reports = pd.read_csv(next((corpus / "radiology_text_reports").glob("validation*.csv")))
    paths = {p.name: p for p in (corpus / "valid").rglob("*.nii.gz")}
    table = metadata.merge(reports, on="VolumeName").head(5)
    folder = tmp_path_factory.mktemp("embed")
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    rows = pd.DataFrame({"image": [str(paths[name]) for name in table["VolumeName"]],
                         "report": table["Findings_EN"].tolist(), "RescaleSlope": table["RescaleSlope"],
                         "RescaleIntercept": table["RescaleIntercept"]})
    broken = pd.DataFrame({"image": [str(folder / "broken.nii.gz")], "report": ["No acute findings."],
                           "RescaleSlope": [1.0], "RescaleIntercept": [-1024.0]})
    rows = pd.concat([rows.iloc[:2], broken, rows.iloc[2:]], ignore_index=True)
    path = folder / "manifest.csv"
    rows.to_csv(path, index=False)
    return path


def _embed(manifest, out, tiny_demo, *extra) -> int:
    from vlp3d.cli import main

    return main(["embed", str(manifest), "--model", CHAMPION, "--out", str(out), "--device", "cpu",
                 "--batch-size", "2", "--part-rows", "2", "--workdir", str(tiny_demo), *extra])


def _vectors(table: pd.DataFrame, column: str) -> list:
    return [None if v is None else np.asarray(v, dtype=np.float32) for v in table[column]]


def test_a_stopped_run_resumes_from_its_parts(manifest, tiny_demo, tmp_path, monkeypatch, capsys):
    from vlp3d.platform import embed

    out = tmp_path / "resumed.parquet"
    real = embed.write_part
    written = []

    def stop_after_two(plan, index, rows):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after two parts
        real(plan, index, rows)
        written.append(index)

    monkeypatch.setattr(embed, "write_part", stop_after_two)
    assert _embed(manifest, out, tiny_demo) == 130  # Ctrl-C: exit 130, as a shell reports SIGINT
    assert "error: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "resumed.parquet.parts").glob("part-*")) == \
        ["part-000000.parquet", "part-000001.parquet"]
    monkeypatch.setattr(embed, "write_part", real)
    resumed = []
    monkeypatch.setattr(embed, "embed_rows", lambda *a, _real=embed.embed_rows, **k: resumed.append(1) or _real(*a, **k))
    assert _embed(manifest, out, tiny_demo) == 0
    assert len(resumed) == 1  # only the third part was embedded again
    assert "parts resumed" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert len(table) == 6 and table["error"].notna().sum() == 1
    # another model or other inputs never reuse those parts
    (tmp_path / "resumed.parquet.parts").mkdir()
    (tmp_path / "resumed.parquet.parts" / "_embed.json").write_text('{"fingerprint": "other"}')
    (tmp_path / "resumed.parquet.parts" / "part-000000.parquet").write_bytes(b"x")
    assert _embed(manifest, out, tiny_demo) == 2
    assert "holds parts embedded from other inputs" in capsys.readouterr().err
