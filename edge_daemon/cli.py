"""edge-daemon: the service on the edge device (DESIGN.md, "Command lines").

Only the help exists so far; run/check-config/doctor arrive with the daemon issue.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context) -> None:
    """Score camera frames with a detector bundle and publish anomaly events over MQTT
    (run, check-config, doctor: not yet available in this version)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def main() -> None:
    """Console-script entry point."""
    app()
