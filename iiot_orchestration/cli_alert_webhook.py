"""``iiot alert-webhook``: the receiver Alertmanager posts to (docs/alerts.md#alertmanager)."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import click

from iiot_orchestration import alerts
from iiot_orchestration.alert_webhook import PATH, AlertmanagerReceiver
from iiot_orchestration.cli_common import _settings, friendly_errors


@click.command("alert-webhook")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9095, show_default=True, help="Port to listen on.")
@click.option(
    "--runbook-base",
    help="URL the rules' runbook paths (docs/runbooks/...) are relative to, e.g. the "
    "repository's web address at the deployed revision.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Require 'Authorization: Bearer <the file's content>' (Alertmanager's "
    "http_config.authorization.credentials_file).",
)
@friendly_errors
def alert_webhook_command(
    host: str, port: int, runbook_base: str | None, token_file: Path | None
) -> None:
    """Receive Alertmanager's webhook and deliver its alerts through the notifier (generic
    webhook, Telegram), recorded in the alerts table and deduplicated."""
    settings = _settings()
    token = token_file.read_text().strip() if token_file else None
    if token_file and not token:
        raise alerts.AlertError(f"{token_file} is empty")
    receiver = AlertmanagerReceiver(
        alerts.Notifier.from_settings(settings),
        settings.database_url,
        runbook_base=runbook_base,
        token=token,
    )
    try:
        server = receiver.serve(host, port)
    except OSError as exc:
        raise alerts.AlertError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    click.echo(f"receiving Alertmanager webhooks on http://{host}:{port}{PATH} (Ctrl-C stops)")
    stop = threading.Event()
    # its own handlers: a process started with SIGTERM or SIGINT ignored (a background job of a
    # non-interactive shell, some service managers) would otherwise never stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    click.echo("stopped")
