"""The relay daemon: `relayctl run` (being written)."""

from __future__ import annotations

import click


@click.command("run")
def run_command() -> None:
    """Run the relay daemon (XDP data plane, userspace path, metrics)."""
    raise click.ClickException("not implemented yet")
