"""`vlp3d embed` on Ray Data actors: the same rows, in the same order, as in one process."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.integration.test_embed import _embed, _vectors, manifest  # noqa: F401 - the module's fixture


def test_two_actors_write_the_rows_one_process_writes(manifest, tiny_demo, ray_session, tmp_path, capsys):  # noqa: F811
    assert _embed(manifest, tmp_path / "local.parquet", tiny_demo) == 0
    assert "1 row(s) refused" in capsys.readouterr().out
    assert _embed(manifest, tmp_path / "actors.parquet", tiny_demo, "--actors", "2") == 0
    out = capsys.readouterr().out
    assert "2 Ray Data actors" in out and "volumes embedded" in out
    local, actors = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "actors.parquet")
    assert list(local["image"]) == list(actors["image"]) == list(pd.read_csv(manifest)["image"])  # input order
    assert not (tmp_path / "actors.parquet.parts").exists()
    for column in ("image_embedding", "report_embedding"):
        for a, b in zip(_vectors(local, column), _vectors(actors, column), strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5)
    # the broken file: no image embedding, its reason recorded; its report and every other row embedded
    assert local["error"].notna().tolist() == [False, False, True, False, False, False]
    assert local["image_embedding"].iloc[2] is None and local["report_embedding"].iloc[2] is not None
    assert "broken.nii.gz" in local["error"].iloc[2] and "\n" not in local["error"].iloc[2]
    assert actors["error"].notna().tolist() == local["error"].notna().tolist()
