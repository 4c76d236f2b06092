"""Prepare and training-data sharding unchanged on a simulated 2-node Ray cluster.

The session already holds a local Ray (tests/conftest.py), so the cluster lives in a subprocess:
see multinode_check.py for what is checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode_check.py")


@pytest.mark.slow
def test_prepare_and_split_on_two_nodes(tmp_path):
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # the script starts its own cluster
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert len(result["nodes"]) == 2
    assert set(result["volume_task_nodes"]) | set(result["encoder_nodes"]) == set(result["nodes"])
    train_rows = result["train_rows"]
    for split, rows in ((result["split_full"], train_rows), (result["split_one_less"], train_rows[:-1])):
        assert split["rows"] == len(rows)
        for epoch in range(2):
            a, b = split["worker0"][epoch], split["worker1"][epoch]
            assert not set(a) & set(b) and len(a) == len(b)
            assert sorted(a + b + split["dropped_per_epoch"][epoch]) == rows
            assert len(split["dropped_per_epoch"][epoch]) == len(rows) % 2
