"""Structured logging for the node: one structlog pipeline for our own loggers and
for the standard-library ones (pynetdicom, apscheduler, sqlalchemy).

Decisions recorded here:

- Rendering: JSON lines (``format = "json"``, or ``"auto"`` when the stream is
  not a terminal, e.g. under systemd/journald) or the console renderer in a
  terminal. Timestamps are ISO 8601 in UTC.
- Context: values bound with ``structlog.contextvars.bind_contextvars`` (job id,
  Study/Series/SOP Instance UIDs) are merged into every line, also the lines of
  third-party libraries logged while they are bound.
- Levels: our loggers use ``logging.level``; pynetdicom and apscheduler are held
  at WARNING (their INFO/DEBUG output is per-PDU noise and may dump datasets).
- PHI: values under keys naming patient identity (patient name, ID, birth date,
  address, ...; any spelling such as ``patient_name`` or ``PatientName``) and any
  pydicom ``PersonName`` value are replaced by ``<masked>`` unless
  ``logging.log_patient_names`` is true. Job ids and UIDs are the keys to find a
  patient's work in the logs.
- Warnings (``warnings.warn``: highdicom, pydicom) are captured into the same
  pipeline (``logging.captureWarnings``), never printed raw on stderr, where
  journald keeps them. Their text is free-form and may quote a patient's name
  (highdicom: ``The string "Doe" is unlikely to represent ...``), so every
  quoted value in a warning, or in a pydicom/highdicom log line, is masked.
- Console tracebacks never show local variables: a frame's locals may hold a
  whole data set. JSON tracebacks never did.
- pydicom logs every pixel-decoder plugin that fails as an ERROR with its
  traceback, then raises one error naming them all, which the job's failure
  reason quotes (`inference.imaging.volume_loader`). Those lines are kept at
  DEBUG without the traceback (`_PluginFailureToDebug`): a bad image is the
  sender's fault, stated once in its job, not a crash of the node.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from pynetdicom import _config as pynetdicom_config

from dicom_node.settings import LoggingSettings

MASK = "<masked>"
_NOISY_LIBRARIES = ("pynetdicom", "apscheduler")
_PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientbirthdate",
        "patientbirthtime",
        "patientbirthname",
        "patientmotherbirthname",
        "otherpatientnames",
        "otherpatientids",
        "patientaddress",
        "patienttelephonenumbers",
    }
)
# Loggers whose free-text messages may quote DICOM values: warnings and the DICOM libraries.
_FREE_TEXT_LOGGERS = ("py.warnings", "pydicom", "highdicom")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_PIXEL_DECODERS = "pydicom.pixels.decoders.base"
_handler: logging.Handler | None = None


def is_phi_key(key: str) -> bool:
    """True for keys naming patient identity, in any of the usual spellings."""
    return key.replace("_", "").replace("-", "").lower() in _PHI_KEYS


def mask_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask patient-identity values (see module docstring)."""
    for key, value in event_dict.items():
        if is_phi_key(key) or type(value).__name__ == "PersonName":
            event_dict[key] = MASK
    logger_name = str(event_dict.get("logger", ""))
    free_text = any(logger_name == name or logger_name.startswith(name + ".") for name in _FREE_TEXT_LOGGERS)
    if free_text and isinstance(event_dict.get("event"), str):
        event_dict["event"] = _QUOTED.sub(f"'{MASK}'", event_dict["event"])
    return event_dict


def configure_logging(settings: LoggingSettings, *, stream: TextIO | None = None) -> None:
    """Install the pipeline on the root logger; calling it again replaces it."""
    global _handler
    stream = sys.stderr if stream is None else stream
    level = logging.getLevelNamesMapping()[settings.level]
    as_json = settings.format == "json" or (settings.format == "auto" and not _is_tty(stream))

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if not settings.log_patient_names:
        shared.append(mask_phi)
    renderer: Any
    if as_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_tty(stream), exception_formatter=_traceback_without_locals()
        )

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    decoders = logging.getLogger(_PIXEL_DECODERS)
    if not any(isinstance(f, _PluginFailureToDebug) for f in decoders.filters):
        decoders.addFilter(_PluginFailureToDebug())
    # pynetdicom's "standard" event handlers format every PDU and DIMSE message for INFO/DEBUG
    # lines that the level above drops anyway: CPU on each C-STORE's path for nothing (issue #18).
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    logging.captureWarnings(False)  # re-install: someone (a test runner) may have replaced showwarning since
    logging.captureWarnings(True)


class _PluginFailureToDebug(logging.Filter):
    """A pixel-decoder plugin's failure, logged by pydicom with a traceback: one DEBUG line (module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _traceback_without_locals() -> Any:
    """Rich tracebacks (when rich is installed) without `show_locals`, else plain ones."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger named like a stdlib logger (``dicom_node.store_scp``)."""
    return structlog.stdlib.get_logger(name)


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
