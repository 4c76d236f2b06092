"""`vlp3d export` on checkpoint folders (no MLflow store): the folder formats through the CLI, and a one-line
reason for each bad input."""

import json

import pytest
import torch

from tests.unit.test_formats.helpers import REPORTS, tiny_embedder, tiny_text_encoder
from vlp3d.cli import main
from vlp3d.config import public_config, to_toml


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pretraining checkpoint folder as training writes the files inference reads."""
    root = tmp_path_factory.mktemp("export")
    embedder = tiny_embedder(tiny_text_encoder(root / "text"))
    folder = root / "checkpoint"
    folder.mkdir()
    torch.save(embedder.model.state_dict(), folder / "model.pt")
    (folder / "config.toml").write_text(to_toml(public_config(embedder.cfg)))
    (folder / "meta.json").write_text(json.dumps(embedder.meta))
    return embedder, folder


def test_exports_a_checkpoint_folder_in_hf_format(checkpoint, tmp_path, capsys):
    from vlp3d.formats.hf import Vlp3dModel

    embedder, folder = checkpoint
    assert main(["export", "--model", str(folder), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert "Vlp3dModel.from_pretrained" in capsys.readouterr().out
    loaded = Vlp3dModel.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(loaded.embed_reports(REPORTS), embedder.embed_reports(REPORTS), rtol=0, atol=1e-6)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "checkpoint folder checkpoint" in card and str(folder) not in card  # no local path in what is shared


@pytest.mark.parametrize(("argv", "reason"), [
    (["--format", "monai-bundle", "{out}"], "is a pretraining checkpoint; a MONAI bundle holds a fine-tuned segmentation"),
    (["--format", "hf", "--out", "{out}", "{other}"], "two outputs given"),
    (["--format", "hf"], "give the output folder"),
])
def test_bad_input_gets_one_line_and_exit_2(checkpoint, tmp_path, capsys, argv, reason):
    _, folder = checkpoint
    argv = [a.format(out=tmp_path / "out", other=tmp_path / "other") for a in argv]
    assert main(["export", "--model", str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_folder_and_a_folder_that_is_not_a_checkpoint(checkpoint, tmp_path, capsys):
    _, folder = checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(folder), "--format", "hf", str(tmp_path / "out")]) == 2
    assert "is a folder that is not empty" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "out"), "--format", "onnx", str(tmp_path / "new")]) == 2
    assert "is a folder without meta.json" in capsys.readouterr().err


def test_an_unknown_format_is_refused_by_name(checkpoint, tmp_path, capsys):
    _, folder = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(folder), "--format", "torchscript", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'torchscript'" in err and "monai-bundle" in err
