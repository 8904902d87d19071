"""`dicom-node config check`: validate a configuration before (re)starting the node.

Exit 0 with a summary of what the node will do, or exit 2 with one red line
naming the file and key (the same message `serve` would stop with). TLS
certificates and keys are loaded too, so a wrong PEM is caught here, and so
are the start-up checks `serve` makes on this host (`dicom_node.preflight`):
every rule's model package loads and verifies, `[worker] device` exists. The
job store is not opened (see `dicom-node db current`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.commands._common import ConfigOption, fail, settings_or_exit
from dicom_node.settings import Destination

config_app = typer.Typer(help="Check the node configuration.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)


@config_app.command("check")
def check(config: Path | None = ConfigOption) -> None:
    """Validate the configuration and print a summary."""
    from dicom_node.preflight import StartupCheckFailed, check_device, check_models
    from dicom_node.routing import compile_rules
    from dicom_node.settings import ConfigError
    from dicom_node.tls import client_ssl_context, server_ssl_context
    from dicom_node.worker import ModelRegistry

    settings = settings_or_exit(config)
    try:
        server_ssl_context(settings.node.tls)
        for destination in settings.destinations:
            client_ssl_context(destination.tls)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    try:
        device = check_device(settings.worker.device, "[worker] device") if settings.worker.count else None
        models = check_models(settings.rules, ModelRegistry())
    except StartupCheckFailed as exc:
        raise fail(str(exc)) from None

    node, storage = settings.node, settings.storage
    summary = Table(title="dicom-node configuration", show_header=False)
    summary.add_column("key", style="bold")
    summary.add_column("value")
    summary.add_row("listen", f"{node.ae_title} on {node.host}:{node.port} (TLS {_on(node.tls.enabled)})")
    summary.add_row("calling AE titles", ", ".join(node.allowed_calling_aets) or "any")
    summary.add_row("source addresses", ", ".join(node.allowed_source_addresses) or "any")
    summary.add_row("max associations", str(node.max_associations))
    summary.add_row("data directory", str(storage.data_dir))
    summary.add_row("database", _hide_password(storage.resolved_database_url))
    summary.add_row(
        "retention",
        f"{storage.retention_days:g} days after export" if storage.retention_days else "keep forever",
    )
    summary.add_row(
        "series complete after",
        f"{settings.series.quiet_period_s:g} s after its association ended "
        f"({settings.series.partial_quiet_period_s:g} s if it looks incomplete)",
    )
    on = f"{settings.worker.device} ({device} here)" if device else settings.worker.device
    summary.add_row("workers", f"{settings.worker.count} on {on}")
    summary.add_row("model packages (verified)", ", ".join(models) or "none (no routing rules)")
    summary.add_row(
        "RTSTRUCT ROI names", f"{settings.outputs.roi_name_prefix}GTV_1, {settings.outputs.roi_name_prefix}GTV_2, ..."
    )
    summary.add_row("logging", f"{settings.logging.format}, {settings.logging.level}")
    console.print(summary)

    destinations = Table(title="destinations")
    for column in ("name", "AE title", "address", "calling AE", "TLS", "objects", "storage commitment"):
        destinations.add_column(column)
    for dest in settings.destinations:
        destinations.add_row(
            dest.name,
            dest.ae_title,
            f"{dest.host}:{dest.port}",
            dest.calling_ae_title or node.ae_title,
            _on(dest.tls.enabled),
            ", ".join(dest.objects),
            _commitment(dest),
        )
    console.print(destinations)

    rules = Table(title="routing rules (first match wins)")
    for column in ("#", "name", "patterns", "model", "destinations"):
        rules.add_column(column)
    for index, rule in enumerate(compile_rules(settings.rules), start=1):
        patterns = "\n".join(f"{p.keyword} {p.describe()}" for p in rule.patterns) or "every series"
        rules.add_row(str(index), rule.name, patterns, rule.rule.model, ", ".join(rule.rule.destinations) or "-")
    console.print(rules)
    console.print("[green]configuration OK[/]")


def _commitment(dest: Destination) -> str:
    if not dest.storage_commitment:
        return "off"
    return f"on, {dest.storage_commitment_timeout_s:g} s"  # the time a report may take


def _on(enabled: bool) -> str:
    return "on" if enabled else "off"


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
