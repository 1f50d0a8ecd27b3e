"""edge-deploy: Ed25519 keys, bundle signing and verification (DESIGN.md, "Command lines").

    edge-deploy keygen --out keys/line3                      # keys/line3.key (0600) + keys/line3.pub
    edge-deploy sign bundles/ae-3 --key keys/line3.key       # (re)sign a bundle folder or .tar
    edge-deploy verify bundles/ae-3 --trusted keys/line3.pub [--trusted other.pub] [--json]

Exit codes: 0 ok, 1 failure of the work, 2 bad usage or bad input (one line ``error: ...`` on stderr,
never a traceback). Fleet push arrives with the remote-update issue.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from deploy import __version__
from deploy.bundle import BundleError, sign_bundle, verify_bundle_details
from deploy.signing import generate_keypair, key_id, load_public_key

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sign and verify detector bundles (keygen, sign, verify).",
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
