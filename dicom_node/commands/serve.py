"""`dicom-node serve`: run the node (SCP, watcher, workers, exporter) until stopped.

Start-up refuses with one line, before the SCP listens, when the job store
cannot be reached, a routing rule's model package does not load and verify, or
(with local workers) `[worker] device` does not exist here: `dicom_node.preflight`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dicom_node.commands._common import ConfigOption, fail, settings_or_exit


def serve(config: Path | None = ConfigOption) -> None:
    """Receive series, run the model on complete ones and send the results on."""
    from dicom_node.http.server import HttpBindError
    from dicom_node.logging_setup import configure_logging, get_logger
    from dicom_node.preflight import StartupCheckFailed, check_device, check_models
    from dicom_node.service import NodeService
    from storage.store_identity import StoreMismatchError

    settings = settings_or_exit(config)
    configure_logging(settings.logging)
    try:
        service = NodeService(settings)
    except Exception as exc:  # e.g. database URL unreachable, data dir not writable
        raise fail(f"cannot start: {exc}") from None
    try:
        # A receive-only serve (no local workers) never runs a model: its packages may live on the GPU hosts only.
        devices = [check_device(settings.worker.device, "[worker] device")] if settings.worker.count else []
        models = check_models(settings.rules, service.registry) if settings.worker.count else []
    except StartupCheckFailed as exc:
        service.db.dispose()
        raise fail(f"cannot start: {exc}") from None
    get_logger(__name__).info("startup.checked", models=models, devices=devices, job_store=service.db.url_for_humans)
    try:
        service.serve_forever()
    except StoreMismatchError as exc:  # the wrong database for this data directory: nothing was deleted
        raise fail(f"cannot start: {exc}") from None
    except HttpBindError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # e.g. port already in use
        raise fail(f"cannot listen on {settings.node.host}:{settings.node.port}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
