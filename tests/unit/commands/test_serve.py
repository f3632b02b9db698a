"""`talkative serve --backend ray` checks the pools of model_groups.json before it starts or joins any cluster:
a bad pool setting is an error naming the group and exit status 2 (the CLI runs in a process of its own, as a user
runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_a_bad_pool_setting_stops_the_ray_backend_before_any_cluster(tmp_path: Path) -> None:
    groups = tmp_path / "model_groups.json"
    model = {"id": "m", "checkpoint": "init:bundled:smollm2-135m-instruct@4"}
    groups.write_text(json.dumps({"model_groups": [{"group_id": "g", "models": [model], "replicas": 0}]}))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"BACKEND", "RAY_ADDRESS", "API_KEY", "API_KEYS", "HOST"}
    }
    done = subprocess.run(
        [sys.executable, "-m", "talkative.cli", "serve", "--backend", "ray", "--model-groups", str(groups)],
        cwd=tmp_path,
        env={**env, "DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "group 'g'" in done.stderr and "'replicas' must be an integer" in done.stderr
    assert "Started a local Ray instance" not in done.stderr
