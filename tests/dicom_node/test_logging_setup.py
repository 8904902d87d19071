"""Logging: JSON lines that parse, console rendering, levels, stdlib loggers
routed through the same pipeline, and patient identity masked by default."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pydicom.valuerep import PersonName

from dicom_node.logging_setup import MASK, configure_logging, get_logger
from dicom_node.settings import LoggingSettings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    configure_logging(LoggingSettings(format="json", level="WARNING"), stream=io.StringIO())


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_parse_with_timestamp_level_and_context() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=stream)
    structlog.contextvars.bind_contextvars(job_id=7, series_uid="1.2.3")
    get_logger("dicom_node.test").info("series.complete", instances=12)
    [record] = lines(stream)
    assert record["event"] == "series.complete" and record["instances"] == 12
    assert record["level"] == "info" and record["logger"] == "dicom_node.test"
    assert record["job_id"] == 7 and record["series_uid"] == "1.2.3"
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="auto"), stream=stream)
    get_logger("x").warning("hello")
    assert lines(stream)[0]["event"] == "hello"


def test_console_format_is_not_json() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="console"), stream=stream)
    get_logger("x").info("hello", job_id=3)
    text = stream.getvalue()
    assert "hello" in text and "job_id=3" in text and not text.startswith("{")


def test_level_filter() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="WARNING"), stream=stream)
    get_logger("x").info("dropped")
    get_logger("x").error("kept")
    assert [r["event"] for r in lines(stream)] == ["kept"]


def test_stdlib_loggers_share_the_pipeline_and_libraries_stay_at_warning() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="DEBUG"), stream=stream)
    logging.getLogger("pynetdicom.assoc").info("per-PDU noise")
    logging.getLogger("pynetdicom.assoc").warning("association %s rejected", "A1")
    logging.getLogger("apscheduler.scheduler").debug("tick")
    [record] = lines(stream)
    assert record["event"] == "association A1 rejected" and record["logger"] == "pynetdicom.assoc"


def test_pynetdicoms_per_message_log_handlers_are_not_bound() -> None:
    """Their INFO/DEBUG lines are dropped (pynetdicom stays at WARNING): formatting every PDU
    and DIMSE message for nothing cost CPU on each C-STORE (issue #18)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    configure_logging(LoggingSettings(format="json", level="DEBUG"), stream=io.StringIO())
    ae = AE()
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", 9, ae_title="NOBODY")  # refused: the handlers were bound anyway
    assert association.get_handlers(evt.EVT_DIMSE_RECV) == []
    assert association.get_handlers(evt.EVT_PDU_SENT) == []


def test_exceptions_are_rendered_in_json() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=stream)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        get_logger("x").exception("store.failed")
    assert "RuntimeError: disk on fire" in lines(stream)[0]["exception"]


def test_patient_identity_masked_by_default() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=stream)
    get_logger("x").info(
        "stored",
        patient_name="Doe^Jane",
        PatientBirthDate="19700101",
        PatientID="P123",
        who=PersonName("Roe^Richard"),
        sop_instance_uid="1.2.3.4",
    )
    text = stream.getvalue()
    for secret in ("Doe", "19700101", "P123", "Roe"):
        assert secret not in text
    record = lines(stream)[0]
    assert record["patient_name"] == MASK and record["who"] == MASK and record["sop_instance_uid"] == "1.2.3.4"


def test_patient_names_logged_when_configured() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", log_patient_names=True), stream=stream)
    get_logger("x").info("stored", patient_name="Doe^Jane")
    assert lines(stream)[0]["patient_name"] == "Doe^Jane"


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=first)
    configure_logging(LoggingSettings(format="json"), stream=second)
    get_logger("x").warning("once")
    assert first.getvalue() == "" and len(lines(second)) == 1


def test_library_warnings_go_through_the_pipeline_with_quoted_values_masked() -> None:
    """highdicom quotes a one-component PatientName in a warning; stderr (journald) must not see it."""
    import warnings

    from highdicom.valuerep import check_person_name

    stream = io.StringIO()
    with warnings.catch_warnings():  # pytest records warnings itself; install ours inside its scope
        warnings.simplefilter("always")
        configure_logging(LoggingSettings(format="json"), stream=stream)
        check_person_name("Zyxwvutsky")
    [record] = lines(stream)
    assert record["logger"] == "py.warnings" and "unlikely to represent" in record["event"]
    assert "Zyxwvutsky" not in stream.getvalue()


def test_console_tracebacks_show_no_local_variables() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="console"), stream=stream)

    def fail_with_a_dataset_in_scope() -> None:
        patient = "Zyxw" + "vutsky^Quenbertha"  # noqa: F841 - a local value a traceback must not show
        raise RuntimeError("disk on fire")

    try:
        fail_with_a_dataset_in_scope()
    except RuntimeError:
        get_logger("x").exception("job.failed")
    text = stream.getvalue()
    assert "disk on fire" in text and "fail_with_a_dataset_in_scope" in text
    assert "Zyxwvutsky" not in text


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_an_undecodable_image_is_one_job_reason_not_decoder_tracebacks_in_the_log(tmp_path, level) -> None:
    """pydicom logs each failing decoder plugin as an ERROR with a traceback; the loader's SeriesError
    already names them all. Real pydicom decoding of a corrupt JPEG Lossless stream."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    from inference.errors import SeriesError
    from inference.imaging.volume_loader import load_series

    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level=level), stream=stream)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream " * 30])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    paths = []
    for k in range(8):
        ds.SOPInstanceUID, ds.ImagePositionPatient = f"1.2.3.{k}", [0, 0, 5 * k]
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=False)
    with pytest.raises(SeriesError, match=r"cannot be decoded: Unable to decode"):
        load_series(paths)
    records = [r for r in lines(stream) if r["logger"].startswith("pydicom")]
    assert not [r for r in records if r["level"] in ("error", "critical") or "exception" in r]
    assert bool(records) == (level == "DEBUG")  # kept, one line each, where debugging is asked for
