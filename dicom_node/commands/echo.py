"""`dicom-node echo HOST PORT`: C-ECHO a DICOM peer (our own node or a destination).

Exit status 0 on a success status, 1 on anything else (refused, rejected,
timeout, failure status), 2 on bad options; the outcome is one line.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from dicom_node.commands._common import fail

console = Console(highlight=False, soft_wrap=True)


def echo(
    host: str = typer.Argument(..., help="Peer host name or IP address."),
    port: int = typer.Argument(..., min=1, max=65535, help="Peer TCP port."),
    aet: str = typer.Option("ECHOSCU", "--aet", help="Our (calling) AE title."),
    aec: str = typer.Option("DICOMNODE", "--aec", help="The peer's (called) AE title."),
    tls: bool = typer.Option(False, "--tls", help="Use TLS, trusting the system CAs."),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", help="PEM CA bundle to verify the peer (implies --tls)."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM client certificate (with --tls-key)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM client private key."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per network step."),
) -> None:
    """Send a C-ECHO (DICOM "ping") and print the outcome."""
    from pydantic import TypeAdapter, ValidationError

    from dicom_node.echo_scu import send_echo
    from dicom_node.settings import AETitle, ConfigError, TlsSettings

    try:
        calling, called = (TypeAdapter(AETitle).validate_python(title) for title in (aet, aec))
        tls_settings = TlsSettings(
            enabled=tls or tls_ca is not None or tls_cert is not None,
            ca_file=tls_ca,
            cert_file=tls_cert,
            key_file=tls_key,
        )
    except ValidationError as exc:
        raise fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    try:
        result = send_echo(
            host, port, calling_ae_title=calling, called_ae_title=called, tls=tls_settings, timeout_s=timeout
        )
    except ConfigError as exc:  # unreadable certificate or key
        raise fail(str(exc)) from None
    if result.ok:
        console.print(f"[green]{result.message}[/] in {result.elapsed_s * 1000:.0f} ms")
        return
    console.print(f"[bold red]{result.message}[/]")
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("echo")(echo)
