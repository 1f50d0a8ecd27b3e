"""edge-deploy: bundle signing, verification and fleet push (DESIGN.md, "Command lines").

Only the help exists so far; keygen/sign/verify/push arrive with the signed-bundle issue.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context) -> None:
    """Sign, verify and push detector bundles (keygen, sign, verify, push: not yet available in this version)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def main() -> None:
    """Console-script entry point."""
    app()
