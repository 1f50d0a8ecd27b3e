"""edge-daemon: score camera frames with a detector bundle and publish anomaly events over MQTT (DESIGN.md).

    edge-daemon run --config /etc/edge-inspect/config.yaml
    edge-daemon check-config FILE          # every problem, one per line, with the YAML line; exit 2 if any
    edge-daemon doctor [--config FILE]     # what this device has; broker and bundle with --config

Exit codes: 0 ok, 1 the work failed, 2 bad usage or bad input, 3 a capability missing on this device.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from edge_daemon.config import DaemonConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help=__doc__)


def _setup_logging(level: str) -> None:
    # systemd's journal adds its own timestamps; a terminal wants them.
    fmt = "%(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty() else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="the daemon's YAML config"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run the daemon until SIGTERM (or until every file source has ended)."""
    from edge_daemon.doctor import opencv_import_problem

    problem = opencv_import_problem()  # not in the daemon extra (a Jetson has JetPack's): a line, not a traceback
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(3)
    from edge_daemon.service import run_daemon

    _setup_logging(log_level)
    raise typer.Exit(run_daemon(config))


@app.command("check-config")
def check_config(file: Path = typer.Argument(..., help="the YAML config to validate")) -> None:
    """Validate a config: print every problem on its own line (with the YAML line), or a summary when it is good."""
    from edge_daemon.config import ConfigError, env_overrides, load_config

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{file}: {problem}", err=True)
        raise typer.Exit(2) from None
    problems, notes = _files_on_this_machine(cfg)
    for problem in problems:
        typer.echo(f"{file}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    for note in notes:
        typer.echo(f"{file}: note: {note}", err=True)
    overrides = env_overrides()
    typer.echo(
        f"{file}: ok (device {cfg.device_id}, {len(cfg.cameras)} camera(s), bundle {cfg.bundle}, "
        f"broker {cfg.mqtt.host}:{cfg.mqtt.port}, digest {cfg.digest()})"
    )
    if overrides:
        typer.echo(f"environment overrides applied: {', '.join(overrides)}")


def _files_on_this_machine(cfg: DaemonConfig) -> tuple[list[str], list[str]]:
    """What the config names on this machine: problems (trusted key files that cannot be read: ``run`` refuses
    every bundle then) and notes (a bundle that is not there, which ``run`` needs unless a pushed update is
    active; a camera's video file that is not there yet, which its camera waits for)."""
    from edge_daemon.capture.sources import parse_source

    problems, notes = [], []
    for key in cfg.trusted_keys:
        try:
            with open(key, "rb") as f:
                f.read(1)
        except OSError as exc:
            problems.append(f"trusted_keys: cannot read {key}: {exc.strerror or exc}")
    if not Path(cfg.bundle).exists():
        notes.append(f"bundle {cfg.bundle} does not exist here: run starts only on a pushed update already active")
    for cam in cfg.cameras:
        spec = parse_source(cam.source)
        if spec.is_file and not Path(str(spec.target)).exists():
            notes.append(f"camera {cam.id}: {spec.describe()} does not exist (yet): the camera waits for it")
    return problems, notes


@app.command()
def doctor(
    config: Path | None = typer.Option(None, "--config", "-c", help="also check this config's broker and bundle"),
) -> None:
    """Report Python, OpenCV (GStreamer, FFmpeg), ONNX Runtime providers, TensorRT and GPU; broker and bundle."""
    from edge_daemon.doctor import run_checks

    checks = run_checks(config)
    for check in checks:
        typer.echo(check.line())
    raise typer.Exit(1 if any(c.level == "FAIL" for c in checks) else 0)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
