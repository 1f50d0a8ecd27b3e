"""The systemd unit and the example config that ship in systemd/: valid, hardened, and in step with the daemon."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_daemon.config import load_config

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "edge-daemon.service")
    return parser


def test_unit_is_a_notify_service_with_a_watchdog_and_hardening() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert svc["User"] == "edge-inspect" and svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["ReadWritePaths"] == "/var/lib/edge-inspect" and svc["StateDirectory"] == "edge-inspect"
    assert svc["RestartPreventExitStatus"].split() == ["2", "3"]  # bad config / missing capability: no restart loop
    assert "edge-daemon run --config /etc/edge-inspect/config.yaml" in svc["ExecStart"]
    assert "kill -HUP" in svc["ExecReload"]


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # the same unit, with ExecStart pointing at a binary that exists here
    text = (SYSTEMD / "edge-daemon.service").read_text()
    text = text.replace("/opt/edge-inspect/venv/bin/edge-daemon", str(Path(sys.executable).parent / "edge-daemon"))
    (tmp_path / "edge-daemon.service").write_text(text)
    res = subprocess.run([analyze, "verify", str(tmp_path / "edge-daemon.service")], capture_output=True, text=True)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if "edge-daemon.service" in ln]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("secret\n")
    monkeypatch.setenv("EDGE_MQTT__PASSWORD_FILE", str(tmp_path / "pw"))
    for key in ("ca", "cert", "key"):  # the files the example names must exist: the config check reads them
        (tmp_path / key).write_text("PEM\n")
        monkeypatch.setenv(f"EDGE_MQTT__TLS__{key.upper()}", str(tmp_path / key))
    cfg = load_config(SYSTEMD / "config.example.yaml")
    assert cfg.device_id == "line3-cam-a" and [c.id for c in cfg.cameras] == ["cam0", "cam1"]
    assert cfg.mqtt.tls is not None and cfg.crop.min_side == 96
