"""edge-deploy keygen / sign / verify as a user runs them: a real subprocess, real keys, real bundles.

Exit codes (DESIGN.md): 0 ok, 2 bad input with ONE line ``error: ...`` on stderr and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.bundle import pack_tar, write_bundle
from deploy.manifest import Calibration, GoldenSpec, InputSpecModel, Manifest
from deploy.signing import key_id, load_public_key

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "edge-deploy"


def edge_deploy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def make_manifest() -> Manifest:
    return Manifest(
        model={"name": "ae", "version": "ae-3-2024-01-01", "config": {}},
        created="2024-01-01T00:00:00Z",
        input=InputSpecModel(height=8, width=8, channels=3),
        outputs={"score": {"shape": ["B"], "dtype": "float32"}, "map": {"shape": ["B", 1, 8, 8], "dtype": "float32"}},
        calibration=Calibration(
            method="quantile",
            target_false_alarm_rate=0.005,
            threshold=0.25,
            raw_min=0.0,
            raw_max=1.0,
            quantiles={"0.5": 0.1},
            n_images=4,
            source="held-out 10% of train/good (4 images)",
        ),
        training={"data": "d", "data_digest": "0" * 64, "n_train": 4, "n_val": 4, "epochs": 1, "seed": 0},
        golden=GoldenSpec(n=0, labels=[], score_rtol=1e-4, score_atol=1e-6, map_atol=1e-5),
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys made by the CLI itself (one keygen call checks the output and the modes)."""
    root = tmp_path_factory.mktemp("keys")
    proc = edge_deploy("keygen", "--out", root / "sub" / "line3")
    assert proc.returncode == 0, proc.stderr
    key, pub = root / "sub" / "line3.key", root / "sub" / "line3.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    assert key_id(load_public_key(pub)) in proc.stdout
    other = edge_deploy("keygen", "--out", root / "other")
    assert other.returncode == 0, other.stderr
    return {"key": key, "pub": pub, "other_key": root / "other.key", "other_pub": root / "other.pub", "root": root}


@pytest.fixture
def unsigned_bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    write_bundle(out, make_manifest(), {"model.onnx": b"onnx bytes", "golden/scores.npy": b"\x93NUMPY"}, None)
    return out


def test_keygen_refuses_to_overwrite(keys: dict[str, Path]) -> None:
    before = keys["key"].read_bytes()
    proc = edge_deploy("keygen", "--out", keys["root"] / "sub" / "line3")
    assert_one_line_error(proc, r"line3\.key exists: refusing to overwrite a key")
    assert keys["key"].read_bytes() == before
    assert_one_line_error(edge_deploy("keygen"), "keygen needs --out PREFIX")


def test_sign_then_verify(unsigned_bundle: Path, keys: dict[str, Path]) -> None:
    assert_one_line_error(edge_deploy("verify", unsigned_bundle, "--trusted", keys["pub"]), "bundle is unsigned")
    proc = edge_deploy("sign", unsigned_bundle, "--key", keys["key"])
    assert proc.returncode == 0, proc.stderr
    assert "signed" in proc.stdout

    kid = key_id(load_public_key(keys["pub"]))
    proc = edge_deploy("verify", unsigned_bundle, "--trusted", keys["other_pub"], "--trusted", keys["pub"])
    assert proc.returncode == 0, proc.stderr
    assert "ae" in proc.stdout and "ae-3-2024-01-01" in proc.stdout and kid in proc.stdout
    assert "model.onnx" in proc.stdout and "golden/scores.npy" in proc.stdout

    proc = edge_deploy("verify", unsigned_bundle, "--trusted", keys["pub"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["model"] == "ae" and report["version"] == "ae-3-2024-01-01"
    assert report["key_id"] == kid and set(report["files"]) == {"model.onnx", "golden/scores.npy"}
    assert report["files"]["model.onnx"]["size"] == len(b"onnx bytes")

    # the same bundle as a .tar
    tar_path = unsigned_bundle.parent / "bundle.tar"
    pack_tar(unsigned_bundle, tar_path)
    proc = edge_deploy("verify", tar_path, "--trusted", keys["pub"])
    assert proc.returncode == 0, proc.stderr


def test_verify_refusals(unsigned_bundle: Path, keys: dict[str, Path]) -> None:
    assert edge_deploy("sign", unsigned_bundle, "--key", keys["key"]).returncode == 0
    kid = key_id(load_public_key(keys["pub"]))
    assert_one_line_error(
        edge_deploy("verify", unsigned_bundle, "--trusted", keys["other_pub"]), rf"signed by an untrusted key {kid}"
    )
    proc = edge_deploy("verify", unsigned_bundle, "--trusted", keys["other_pub"], "--json")
    assert_one_line_error(proc, "untrusted key")
    assert json.loads(proc.stdout)["ok"] is False
    assert_one_line_error(edge_deploy("verify", unsigned_bundle), r"verify needs at least one --trusted PUB")
    assert_one_line_error(
        edge_deploy("verify", unsigned_bundle.parent / "absent", "--trusted", keys["pub"]), "no bundle at"
    )
    (unsigned_bundle / "model.onnx").write_bytes(b"onnx bytez")
    assert_one_line_error(
        edge_deploy("verify", unsigned_bundle, "--trusted", keys["pub"]), r"file model\.onnx was changed"
    )
    assert_one_line_error(edge_deploy("sign", unsigned_bundle, "--key", keys["key"]), r"file model\.onnx was changed")


def test_sign_refusals(unsigned_bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(keys["key"].read_bytes())
    os.chmod(loose, 0o644)
    assert_one_line_error(edge_deploy("sign", unsigned_bundle, "--key", loose), r"run chmod 600 .*loose\.key")
    assert_one_line_error(
        edge_deploy("sign", unsigned_bundle, "--key", keys["pub"]),
        r"line3\.pub is a public key; signing needs the private key",
    )
    assert_one_line_error(edge_deploy("sign", unsigned_bundle), r"sign needs --key PREFIX\.key")
    assert not (unsigned_bundle / "signature").exists()


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="edge-deploy console script is not installed in this venv")
def test_console_script(unsigned_bundle: Path, keys: dict[str, Path]) -> None:
    proc = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "keygen" in proc.stdout and "verify" in proc.stdout
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "verify", str(unsigned_bundle), "--trusted", str(keys["pub"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc, "bundle is unsigned")
