"""`vlp3d models` and `vlp3d export` through the CLI."""

from vlp3d.cli import main


def test_models_lists_every_encoder_and_preset(capsys):
    assert main(["models", "data.shape=[32, 32, 32]", "--no-memory"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet3d", "swin3d", "vit3d", "unimedi_vit"):
        assert out.count(name) == 4, name
    assert "<- configured" in out


def test_export_refuses_a_mismatched_encoder_with_a_clear_error(tiny_demo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_demo / 'mlflow.db'}")
    rc = main(["export", "--model", "models:/vlp3d-clip@champion", "--format", "swinunetr",
               "--out", str(tiny_demo / "enc.pt")])
    assert rc == 2
    assert "model.image_encoder = 'resnet3d'" in capsys.readouterr().err
