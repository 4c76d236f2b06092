import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["max_workers"] == config["max_workers"]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _ray_starts(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
            if "ray start" in c]


def test_every_ray_start_uses_token_auth():
    starts = _ray_starts(_config())
    assert len(starts) == 2
    for command in starts:
        # the variable set for this very command, not somewhere earlier in the shell
        assert "RAY_AUTH_MODE=token ray start" in command, command


def test_the_dashboard_listens_on_localhost_only():
    head = next(c for c in _ray_starts(_config()) if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()


def test_the_token_is_made_on_the_head_and_synced_to_workers_not_written_in_the_file():
    config = _config()
    assert any("ray get-auth-token --generate" in c and "umask 077" in c for c in config["head_setup_commands"])
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]
    assert any("test -s ~/.ray/auth_token" in c for c in config["worker_start_ray_commands"])
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN=" not in text
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), "a token-like literal in cluster.yaml"


def test_file_mounts_ship_what_submit_uploads_and_exclude_its_deny_list():
    """cluster.yaml syncs the allow-list of `vlp3d submit` (vlp3d/platform/upload.py), not the checkout,
    and rsync leaves out every name the upload's deny-list refuses."""
    from vlp3d.platform.upload import ALLOWED, DENIED

    config = _config()
    mounts = config["file_mounts"]
    assert sorted(mounts.values()) == sorted(f"./{name}" for name in ALLOWED)
    assert all(remote == f"/home/ubuntu/vlp3d/{local[2:]}" for remote, local in mounts.items())
    assert set(DENIED) <= set(config["rsync_exclude"])
    assert "." not in mounts.values()
