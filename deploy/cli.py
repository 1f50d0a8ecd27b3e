"""edge-deploy: Ed25519 keys, bundle signing and verification (DESIGN.md, "Command lines").

    edge-deploy keygen --out keys/line3                      # keys/line3.key (0600) + keys/line3.pub
    edge-deploy sign bundles/ae-3 --key keys/line3.key       # (re)sign a bundle folder or .tar
    edge-deploy verify bundles/ae-3 --trusted keys/line3.pub [--trusted other.pub] [--json]
    edge-deploy push bundles/ae-3.tar --device line3-cam-a --broker mqtt.plant.local:1883 --wait
    edge-deploy push bundles/ae-3.tar --devices 'line3-*' --broker mqtt.plant.local --wait   # fleet

Exit codes: 0 ok, 1 failure of the work, 2 bad usage or bad input (one line ``error: ...`` on stderr,
never a traceback). push: 0 every device active (--wait) or acknowledged, 1 any device failed or timed out,
2 bad input (nothing was sent). push's logic lives in deploy.push; this is a thin wrapper.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from deploy import __version__
from deploy.bundle import BundleError, sign_bundle, verify_bundle_details
from deploy.push import (
    BrokerSettings,
    BundleInfo,
    PushError,
    PushReport,
    parse_broker,
    progress_table,
    read_password_file,
    summary_table,
)
from deploy.push import push as run_push
from deploy.signing import generate_keypair, key_id, load_public_key

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sign, verify and push detector bundles (keygen, sign, verify, push).",
)
T = TypeVar("T")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


def _run(fn: Callable[[], T]) -> T:
    """Run a command body: a BundleError (bad input) is one line and exit 2; other OS errors exit 1."""
    try:
        return fn()
    except BundleError as exc:
        raise _fail(str(exc), 2) from None
    except OSError as exc:
        raise _fail(f"{exc.filename or ''} {exc.strerror or exc}".strip(), 1) from None


@app.command()
def keygen(
    out: Annotated[
        Path | None, typer.Option("--out", help="key prefix: writes PREFIX.key (private, 0600) and PREFIX.pub")
    ] = None,
) -> None:
    """Create an Ed25519 key pair. Never overwrites existing keys."""
    if out is None:
        raise _fail("keygen needs --out PREFIX (writes PREFIX.key and PREFIX.pub)", 2)
    prefix = out
    key_path, pub_path = _run(lambda: generate_keypair(prefix))
    kid = _run(lambda: key_id(load_public_key(pub_path)))
    typer.echo(f"wrote {key_path} (private, mode 0600: keep it secret) and {pub_path} (public); key id {kid}")


@app.command()
def sign(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar")],
    key: Annotated[Path | None, typer.Option("--key", help="private key (PREFIX.key from keygen)")] = None,
) -> None:
    """(Re)sign a bundle after checking that its files match its manifest."""
    if key is None:
        raise _fail("sign needs --key PREFIX.key (the private key from edge-deploy keygen)", 2)
    key_path = key
    _run(lambda: sign_bundle(bundle, key_path))
    typer.echo(f"signed {bundle}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar")],
    trusted: Annotated[
        list[Path] | None, typer.Option("--trusted", help="trusted public key (PREFIX.pub); repeat for several")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
) -> None:
    """Check signature (trusted key), every file's sha256, no extra/missing file, schema and daemon version."""
    if not trusted:
        raise _fail("verify needs at least one --trusted PUB (a public key from edge-deploy keygen)", 2)
    try:
        result = verify_bundle_details(bundle, trusted, daemon_version=__version__)
    except BundleError as exc:
        if json_out:
            typer.echo(json.dumps({"ok": False, "bundle": str(bundle), "error": str(exc)}))
        raise _fail(str(exc), 2) from None
    m = result.manifest
    files: dict[str, dict[str, str | int]] = {
        name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(m.files.items())
    }
    if json_out:
        report = {
            "ok": True,
            "bundle": str(bundle),
            "model": m.model.get("name"),
            "version": m.model.get("version"),
            "created": m.created,
            "schema_version": m.schema_version,
            "min_daemon_version": m.min_daemon_version,
            "key_id": result.key_id,
            "manifest_sha256": result.manifest_sha256,
            "threshold": m.calibration.threshold,
            "files": files,
        }
        typer.echo(json.dumps(report, sort_keys=True))
        return
    typer.echo(f"ok: {bundle}")
    typer.echo(f"  model    {m.model.get('name')} {m.model.get('version')} (created {m.created})")
    typer.echo(f"  signed   by key {result.key_id}")
    typer.echo(f"  manifest sha256 {result.manifest_sha256} (schema {m.schema_version})")
    typer.echo(f"  files    {len(m.files)}, {sum(e.size for e in m.files.values())} bytes")
    for name, e in sorted(m.files.items()):
        typer.echo(f"    {e.size:>12}  {e.sha256[:16]}  {name}")


PUSH_HELP = (
    "Push a signed bundle to device(s) over MQTT and follow their model/state.\n\n"
    "This machine serves the bundle over HTTP (resumable) and sends each device only its URL and sha256. "
    "Without --wait, push returns once every device has acknowledged (and, while push serves the bundle, "
    "finished downloading it); the HTTP server stops when push exits, so use --wait, or --url with your own "
    "server, for devices that may need to download it again.\n\n"
    "Exit 0 only when every device is active (--wait) or has acknowledged; 1 if any failed or timed out; "
    "2 bad input (then nothing was sent)."
)


@app.command(help=PUSH_HELP)
def push(
    bundle: Annotated[Path, typer.Argument(help="signed bundle: a .tar (edge-trainer export --tar) or a folder")],
    device: Annotated[str | None, typer.Option("--device", help="one device id")] = None,
    devices: Annotated[
        str | None,
        typer.Option("--devices", help="glob of device ids, e.g. 'line3-*': the online ones get the bundle"),
    ] = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="MQTT broker HOST:PORT (port 1883, 8883 with TLS)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until every device is active, refused or rolled back")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the devices")] = 600.0,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", help="the daemons' mqtt.topic_prefix")] = "inspect",
    serve: Annotated[
        str, typer.Option("--serve", help="bind of the bundle's HTTP server, HOST:PORT (port 0 = any free port)")
    ] = "0.0.0.0:0",
    advertise: Annotated[
        str | None,
        typer.Option(
            "--advertise",
            help="host name/IP the devices use to reach this machine (default: its address towards the broker)",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="do not serve: BUNDLE (.tar) is already at this http(s):// or file:// URL"),
    ] = None,
    trusted: Annotated[
        list[Path] | None,
        typer.Option("--trusted", help="check the signature against this public key first (repeatable)"),
    ] = None,
    tls: Annotated[bool, typer.Option("--tls", help="MQTT over TLS (implied by --cafile/--cert)")] = False,
    cafile: Annotated[Path | None, typer.Option("--cafile", help="CA certificate(s) of the broker (PEM)")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="client certificate (PEM), with --key")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="client private key (PEM)")] = None,
    username: Annotated[str | None, typer.Option("--username", help="MQTT user name")] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="file whose first line is the MQTT password")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="no live display; print the report as one JSON object")
    ] = False,
) -> None:
    """Push a signed bundle to device(s) over MQTT and follow their model/state (help: PUSH_HELP)."""
    try:
        if (device is None) == (devices is None):
            raise PushError("give exactly one of --device ID or --devices GLOB")
        if broker is None:
            raise PushError("push needs --broker HOST:PORT (the MQTT broker the devices use)")
        if (cert is None) != (key is None):
            raise PushError("--cert and --key go together: give both or neither")
        host, port = parse_broker(broker, tls=tls or cafile is not None or cert is not None)
        password = read_password_file(password_file) if password_file is not None else None
        if password is not None and username is None:
            raise PushError("--password-file needs --username")
        settings = BrokerSettings(
            host, port, tls=tls, cafile=cafile, certfile=cert, keyfile=key, username=username, password=password
        )
        targets: str | list[str] = devices if devices is not None else [str(device)]
        options: dict[str, Any] = {
            "topic_prefix": topic_prefix,
            "wait": wait,
            "timeout": timeout,
            "serve": serve,
            "advertise": advertise,
            "url": url,
            "trusted": trusted or (),
        }
        if json_out:
            report = run_push(bundle, targets, settings, **options)
            typer.echo(json.dumps(report.to_json(), sort_keys=True))
        else:
            report = _push_with_display(bundle, targets, settings, options)
    except PushError as exc:
        raise _fail(str(exc), exc.code) from None
    raise typer.Exit(report.exit_code)


def _push_with_display(
    bundle: Path, targets: str | list[str], settings: BrokerSettings, options: dict[str, Any]
) -> PushReport:
    """push with a rich live table on a terminal, one line per phase change otherwise, then the summary."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    live: Live | None = None
    printed: dict[str, int] = {}
    ended: set[str] = set()

    def on_start(info: BundleInfo, the_url: str, devs: list[str], skipped: dict[str, str]) -> None:
        nonlocal live
        console.print(
            f"pushing {info.name} {info.version} ({info.size / 1e6:.1f} MB, sha256 {info.sha256[:16]}) "
            f"to {len(devs)} device(s) from {the_url}",
            highlight=False,
            soft_wrap=True,
        )
        for d, status in skipped.items():
            console.print(f"skipped {d}: status {status}", highlight=False)
        if console.is_terminal:
            live = Live(console=console, refresh_per_second=4, transient=True)
            live.start()

    def on_progress(report: PushReport) -> None:
        if live is not None:
            live.update(progress_table(report))
            return
        for r in report.devices:  # a log-friendly line per new phase, then one for a final outcome
            seen = printed.get(r.device, 0)
            for phase in r.phases[seen:]:
                reason = f": {r.reason}" if r.reason and phase == r.phase else ""
                console.print(f"{r.device}  {phase}{reason}  ({r.elapsed_s:.1f} s)", highlight=False, soft_wrap=True)
            printed[r.device] = len(r.phases)
            if r.outcome in ("timed out", "not sent") and r.device not in ended:
                ended.add(r.device)
                console.print(f"{r.device}  {r.outcome}: {r.reason}", highlight=False, soft_wrap=True)

    try:
        report = run_push(bundle, targets, settings, on_progress=on_progress, on_start=on_start, **options)
    finally:
        if live is not None:
            live.stop()
    console.print(summary_table(report))
    return report


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
