"""The user's path from a trained run to a verified bundle, through the real command lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.engines import probe_device
from trainer.train import TrainOptions, train


def run_cli(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AE trained one epoch on 120 real magnetic-tile images (grey, 32 px)."""
    data = tmp_path_factory.mktemp("data") / "tiles"
    (data / "train" / "good").mkdir(parents=True)
    for p in sorted((shared_data / "magnetic_tile" / "train" / "good").iterdir())[:120]:
        shutil.copy(p, data / "train" / "good" / p.name)
    run = tmp_path_factory.mktemp("runs") / "ae"
    train(
        TrainOptions(
            model="ae",
            data=data,
            out=run,
            epochs=1,
            batch_size=16,
            image_size=32,
            device="cpu",
            model_options={"base_channels": 8, "latent": 16},
        )
    )
    return run


def test_keygen_export_verify_compile(trained: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys" / "line3"
    assert run_cli("deploy.cli", "keygen", "--out", keys).returncode == 0
    bundle = tmp_path / "bundle"
    # 12 held-out images cannot vouch for a 0.5% false-alarm rate: refused, then forced (this tests the bundle flow)
    res = run_cli("trainer", "export", trained, "--out", bundle, "--sign-key", f"{keys}.key")
    assert res.returncode == 2 and "only 12 held-out normal image(s)" in res.stderr, res.stderr
    res = run_cli("trainer", "export", trained, "--out", bundle, "--sign-key", f"{keys}.key", "--force-threshold")
    assert res.returncode == 0, res.stderr
    assert "parity ok" in res.stdout + res.stderr

    res = run_cli("deploy.cli", "verify", bundle, "--trusted", f"{keys}.pub", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True

    # A second export into the same folder is refused, in one line, with exit 2.
    res = run_cli("trainer", "export", trained, "--out", bundle)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1

    res = run_cli("trainer", "compile", bundle, "--precision", "fp16")
    if probe_device().missing():
        assert res.returncode == 3, res.stderr
        assert "TensorRT" in res.stderr and "Traceback" not in res.stderr
