"""Shards and checkpoints in a bucket of an S3-compatible server (moto_server, the `s3_server`
fixture): prepare uploads the shards, pretraining reads them and keeps Ray Train's checkpoints
there, a worker failure resumes from the checkpoint in the bucket, the model registered from it is
evaluated on shards read through a `file://` URI and promoted."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from vlp3d import storage
from vlp3d.config import load_config
from vlp3d.data.shards import read_manifest, resolve_shard_dir, shard_files


@pytest.mark.slow
def test_shards_and_checkpoints_in_a_bucket(tiny_demo, s3_server, tmp_path, monkeypatch):
    from vlp3d.platform.evaluate import evaluate
    from vlp3d.platform.mlflow.registry import promote
    from vlp3d.platform.prepare import prepare, staging_folder
    from vlp3d.platform.pretrain import pretrain
    from vlp3d.train.loop import FAULT_ENV

    root = f"{s3_server}/{tmp_path.name}"
    work = tmp_path / "work"
    cfg = load_config(tiny_demo / "config.toml", [
        f"data.shards={root}/shards", f"tracking.storage={root}/runs", f"tracking.workdir={work}",
        "train.max_steps=3", "train.global_batch=4", "train.checkpoint_every=1", "train.log_every=1",
        "train.val_every=0", "train.max_failures=1", "cluster.num_workers=1", "cluster.cpus_per_worker=1"])
    uri = f"sqlite:///{work / 'mlflow.db'}"

    # prepare into the bucket: the staging folder (here: finished, as a run whose upload was cut off
    # leaves it; the Ray Data pipeline that fills it is test_prepare's) is uploaded, manifest last,
    # and removed; the same corpus again is a no-op
    local = resolve_shard_dir(tiny_demo / "shards")
    shutil.copytree(local, staging_folder(cfg, cfg.data.shards) / local.name)
    # the same patients as the demo's shards: their patient key is shared (evaluated on those below)
    monkeypatch.setenv("VLP3D_PATIENT_KEY_FILE", str(tiny_demo / "shards" / "_patient_key"))
    prepared = prepare(cfg, str(tiny_demo / "corpus"), cfg.data.shards, progress=lambda line: None)
    assert storage.read_text(f"{root}/shards/_patient_key") == (tiny_demo / "shards" / "_patient_key").read_text()
    assert prepared.shard_dir == f"{root}/shards/{local.name}"
    assert read_manifest(prepared.shard_dir) == read_manifest(local)
    assert [storage.name(f) for f in shard_files(prepared.shard_dir)] == [storage.name(f) for f in shard_files(local)]
    assert not staging_folder(cfg, cfg.data.shards).exists()
    assert prepare(cfg, str(tiny_demo / "corpus"), cfg.data.shards, progress=lambda line: None).skipped

    # pretrain on the bucket's shards; the worker fails at step 3, before its checkpoint: the
    # restarted worker resumes from step 2's checkpoint in the bucket
    monkeypatch.setenv(FAULT_ENV, "3:0:raise")
    result = pretrain(cfg, run_name="bucket", progress=None)
    assert str(result.checkpoint_dir).startswith(f"{root}/runs/bucket/checkpoint_")
    assert json.loads(storage.read_text(storage.join(result.checkpoint_dir, "meta.json")))["step"] == 3
    kept = [storage.name(e) for e, folder in storage.list_dir(f"{root}/runs/bucket") if folder]
    assert len([name for name in kept if name.startswith("checkpoint_")]) == cfg.train.keep_checkpoints
    assert not (work / "ray_results").exists()
    client = MlflowClient(tracking_uri=uri)
    assert "resume-2.txt" in {a.path for a in client.list_artifacts(result.run_id)}
    assert sorted({m.step for m in client.get_metric_history(result.run_id, "train/loss")}) == [1, 2, 3]

    # the model registered from the (downloaded) checkpoint: evaluated on shards through file://, promoted
    report = evaluate(result.model_uri, (tiny_demo / "shards").as_uri(), uri, n_boot=0)
    assert report.shard_dir == f"{(tiny_demo / 'shards').as_uri()}/{local.name}"
    assert report.result.n == read_manifest(local)["counts"]["by_split"]["valid"]
    assert promote(uri, result.model_uri, force=True)[0]
