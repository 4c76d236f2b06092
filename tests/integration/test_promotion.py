"""Model card, leakage check and promotion by the paired bootstrap rule on the tiny demo's registry."""

import pytest


def test_model_card_leakage_check_and_a_challenger_no_better_than_the_champion(tiny_demo):
    from vlp3d.platform.evaluate import LeakageError, evaluate, promote
    from vlp3d.platform.mlflow.store import client

    uri, shards = f"sqlite:///{tiny_demo / 'mlflow.db'}", str(tiny_demo / "shards")
    registry = client(uri)
    champion = registry.get_model_version_by_alias("vlp3d-clip", "champion")
    # the demo's evaluation wrote the card: description, tags and the plots beside the tables
    assert champion.description.startswith(f"# vlp3d-clip version {champion.version}")
    assert "Retrieval among all" in champion.description and "## Zero-shot classification, split 'valid'" in \
        champion.description
    assert champion.tags["vlp3d.method"] == "clip" and champion.tags["vlp3d.image_encoder"] == "resnet3d/tiny"
    assert float(champion.tags["vlp3d.train_flops"]) > 0 and champion.tags["vlp3d.train_steps"] == "4"
    assert champion.tags["vlp3d.promotion.decision"] == "promoted"  # the first version: no holder before
    assert len(champion.tags["vlp3d.eval.valid.split_hash"]) == 12
    plots = {a.path for a in registry.list_artifacts(champion.run_id, "eval")}
    assert {"eval/valid_roc.png", "eval/valid_reliability.png"} <= plots

    # scoring the model on the patients it pretrained on is refused (counted, none named)
    with pytest.raises(LeakageError, match=r"refusing to evaluate on split 'train'.* patients were in the model's "
                                           r"pretraining data") as refused:
        evaluate(f"models:/vlp3d-clip/{champion.version}", shards, uri, split="train", log=False)
    assert "train_" not in str(refused.value).split("pretraining data")[1]

    # a challenger with the same weights is no better: the interval of the difference is [0, 0]
    challenger = registry.create_model_version("vlp3d-clip", champion.source, run_id=champion.run_id)
    moved, message = promote(uri, "vlp3d-clip", challenger.version, shards, "valid", metric="v2r/recall_at_1",
                             n_boot=50)
    assert not moved and f"champion stays at version {champion.version}" in message
    tags = registry.get_model_version("vlp3d-clip", challenger.version).tags
    assert tags["vlp3d.promotion.decision"] == "rejected" and float(tags["vlp3d.promotion.difference"]) == 0
    assert float(tags["vlp3d.promotion.ci_low"]) == 0 and tags["vlp3d.promotion.champion_version"] == str(champion.version)
    assert tags["vlp3d.promotion.split_hash"] == champion.tags["vlp3d.eval.valid.split_hash"]
    assert registry.get_model_version_by_alias("vlp3d-clip", "champion").version == champion.version
    registry.delete_model_version("vlp3d-clip", challenger.version)  # other tests count the versions
