"""Configuration: defaults, the example file's contract, environment overrides,
and one clear message per kind of mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.settings import ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "node.example.toml"
VALID_DESTINATION = '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = 11113\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env=env or {})
    return str(caught.value)


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.node.ae_title == "DICOMNODE"
    assert (settings.node.host, settings.node.port) == ("127.0.0.1", 11112)
    assert settings.node.allowed_calling_aets == [] and settings.node.is_calling_aet_allowed("ANY")
    assert settings.storage.data_dir == tmp_path / "var"
    assert settings.storage.resolved_database_url == f"sqlite:///{tmp_path}/var/dicom-node.db"
    assert settings.storage.retention_days is None
    assert settings.series.quiet_period_s == 5
    assert settings.logging.format == "auto" and not settings.logging.log_patient_names
    assert settings.rules == [] and settings.destinations == []


def test_example_file_matches_the_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory
    settings = load_settings(EXAMPLE, env={})
    assert settings.node.ae_title == "DICOMNODE"
    assert (settings.node.host, settings.node.port) == ("127.0.0.1", 11112)
    assert settings.node.allowed_calling_aets == [] and settings.node.allowed_source_addresses == []
    assert settings.storage.data_dir == tmp_path / "var"
    assert settings.series.quiet_period_s == 5
    [rule] = settings.rules
    assert (rule.name, rule.model, rule.match, rule.destinations) == (
        "brain-mr",
        "default",
        {"Modality": "MR"},
        ["tps"],
    )
    tps = settings.destination("tps")
    assert (tps.ae_title, tps.host, tps.port, tps.calling_ae_title) == ("TPS", "127.0.0.1", 11113, None)
    assert not settings.node.tls.enabled and not tps.tls.enabled


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    models = [Settings.model_fields[s].annotation for s in ("node", "storage", "series", "worker", "export", "logging")]
    keys = {key for model in models for key in model.model_fields}  # type: ignore[union-attr]
    keys |= {"cert_file", "key_file", "ca_file", "require_client_cert", "calling_ae_title", "objects", "match", "model"}
    missing = [key for key in sorted(keys) if f"{key} =" not in text and f".{key}]" not in text]
    assert missing == []


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nae_title = "FROMFILE"\n')
    assert load_settings(env={"DICOM_NODE_CONFIG": str(path)}).node.ae_title == "FROMFILE"


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "DICOM_NODE__NODE__PORT": "11200",
        "DICOM_NODE__NODE__AE_TITLE": "123",  # stays text, not an int
        "DICOM_NODE__NODE__TLS__REQUIRE_CLIENT_CERT": "false",
        "DICOM_NODE__NODE__ALLOWED_CALLING_AETS": '["CT1", "MR1"]',
        "DICOM_NODE__STORAGE__DATA_DIR": "/srv/x",
        "DICOM_NODE__STORAGE__RETENTION_DAYS": "7.5",
        "DICOM_NODE__DESTINATIONS__0__HOST": "tps.example.org",
        "DICOM_NODE__LOGGING__LEVEL": "debug",
        "DICOM_NODE__SERIES__QUIET_PERIOD_S": "",  # empty: back to the default
        "UNRELATED": "x",
    }
    settings = load_settings(EXAMPLE, env=env)
    assert settings.node.port == 11200 and settings.node.ae_title == "123"
    assert settings.node.allowed_calling_aets == ["CT1", "MR1"]
    assert not settings.node.is_calling_aet_allowed("OTHER")
    assert settings.storage.data_dir == Path("/srv/x")
    assert settings.storage.resolved_database_url == "sqlite:////srv/x/dicom-node.db"
    assert settings.storage.retention_days == 7.5
    assert settings.destination("tps").host == "tps.example.org"
    assert settings.logging.level == "DEBUG"
    assert settings.series.quiet_period_s == 5


def test_environment_overrides_rule_patterns_keeping_keyword_case() -> None:
    env = {"DICOM_NODE__RULES__0__MATCH__SeriesDescription": "~T1", "DICOM_NODE__RULES__0__MODEL": "/models/x"}
    [rule] = load_settings(EXAMPLE, env=env).rules
    assert rule.match == {"Modality": "MR", "SeriesDescription": "~T1"} and rule.model == "/models/x"
    [rule] = load_settings(EXAMPLE, env={"DICOM_NODE__RULES__0__MATCH": '{Modality = "CT"}'}).rules
    assert rule.match == {"Modality": "CT"}


def test_source_address_allow_list() -> None:
    settings = load_settings(env={"DICOM_NODE__NODE__ALLOWED_SOURCE_ADDRESSES": '["10.1.0.0/16", "::1"]'})
    assert settings.node.is_source_allowed("10.1.2.3") and settings.node.is_source_allowed("::1")
    assert not settings.node.is_source_allowed("10.2.0.1")
    assert not settings.node.is_source_allowed("not-an-address")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[node]\nport = 70000\n", "node.port: Input should be less than or equal to 65535"),
        ('[node]\nport = "abc"\n', "node.port: Input should be a valid integer"),
        ("[node]\nprot = 1\n", "node.prot: unknown key"),
        ("[nodes]\nport = 1\n", "nodes: unknown key"),
        ('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title: AE title 'ABCDEFGHIJKLMNOPQ' is longer than 16"),
        ('[node]\nae_title = "   "\n', "node.ae_title: AE title must not be empty"),
        ('[node]\nae_title = "A\\\\B"\n', "node.ae_title: AE title 'A\\\\B' contains a backslash"),
        ('[node]\nallowed_calling_aets = ["OK", "BAD\\u0001"]\n', "node.allowed_calling_aets[1]:"),
        ('[node]\nallowed_source_addresses = ["10.0.0.0/33"]\n', "node.allowed_source_addresses: '10.0.0.0/33' is not"),
        ("[node.tls]\nenabled = true\n", "node: tls.enabled needs tls.cert_file and tls.key_file"),
        ('[node.tls]\nenabled = true\ncert_file = "missing.pem"\nkey_file = "k.pem"\n', "node.tls: cert_file"),
        ('[storage]\ndatabase_url = "nonsense"\n', "storage.database_url: not a valid SQLAlchemy database URL"),
        ("[storage]\nretention_days = 0\n", "storage.retention_days: Input should be greater than 0"),
        ('[worker]\ndevice = "gpu"\n', "worker.device: String should match pattern"),
        (
            '[outputs]\nroi_name_prefix = "HOSPITAL_AI_"\n',
            "is too long: ROI Name (3006,0026) holds 16 characters and 'HOSPITAL_AI_GTV_99' has 18; use at most 10",
        ),
        ('[logging]\nformat = "xml"\n', "logging.format: Input should be 'auto', 'json' or 'console'"),
        ('[logging]\nlevel = "LOUD"\n', "logging.level: unknown log level 'LOUD'"),
        (
            "[export]\nretry_initial_s = 10\nretry_max_interval_s = 5\n",
            "export: retry_max_interval_s must be >= retry_initial_s",
        ),
        (
            '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nport = 104\n',
            "destinations[0] ('pacs').host: required key is missing",
        ),
        (VALID_DESTINATION + VALID_DESTINATION, "destinations[].name: duplicate name(s) tps"),
        (
            '[[rules]]\nname = "r"\ndestinations = ["nowhere"]\n',
            "rules[0] ('r').destinations: unknown destination(s) nowhere",
        ),
        (
            '[[rules]]\nname = "broken"\nmatch = { Modality = "(MR" }\n',
            "rules[0] ('broken'): match.Modality: invalid regex '(MR'",
        ),
        (
            '[[rules]]\nname = "typo"\nmatch = { modality = "MR" }\n',
            "rules[0] ('typo'): match: 'modality' is not a DICOM keyword",
        ),
        ('[[rules]]\nname = "seq"\nmatch = { ReferencedImageSequence = "x" }\n', "has no text value to match"),
        ("[node\n", "invalid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error_for(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'node.toml'}: ")
    assert expected in message
    assert "\n" not in message


def test_error_names_the_environment_variable(tmp_path: Path) -> None:
    message = error_for(tmp_path, "", env={"DICOM_NODE__NODE__PORT": "abc"})
    assert "node.port:" in message and "[set by environment DICOM_NODE__NODE__PORT]" in message


def test_environment_cannot_index_a_missing_list_entry(tmp_path: Path) -> None:
    message = error_for(tmp_path, "", env={"DICOM_NODE__DESTINATIONS__0__HOST": "x"})
    assert message.startswith("environment DICOM_NODE__DESTINATIONS__0__HOST: destinations has no entry 0")


def test_database_password_never_echoed(tmp_path: Path) -> None:
    message = error_for(tmp_path, "", env={"DICOM_NODE__STORAGE__DATABASE_URL": "x:/u:s3cret@h"})
    assert "s3cret" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_config_check_prints_summary() -> None:
    result = CliRunner().invoke(app, ["config", "check", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "DICOMNODE on 127.0.0.1:11112" in result.output
    assert "brain-mr" in result.output and "^(?:MR)$" in result.output
    assert "configuration OK" in result.output


def test_config_check_hides_database_password() -> None:
    env = {"DICOM_NODE__STORAGE__DATABASE_URL": "postgresql://node:s3cret@db/dicom"}
    result = CliRunner().invoke(app, ["config", "check", "--config", str(EXAMPLE)], env=env)
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output and "postgresql://node:***@db/dicom" in result.output


@pytest.mark.slow
def test_config_check_error_is_one_message_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 70000\n")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "300", "PATH": ""},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "node.port" in lines[0] and str(path) in lines[0]


def test_config_check_rejects_unloadable_certificate(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    path = write(tmp_path, f'[node.tls]\nenabled = true\ncert_file = "{bogus}"\nkey_file = "{bogus}"\n')
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 2
    assert "cannot load certificate" in result.output


def test_destination_objects_filter_from_toml_and_in_config_check(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_DESTINATION + 'objects = ["RTSTRUCT"]\n')
    assert load_settings(path, env={}).destination("tps").objects == ["RTSTRUCT"]
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "RTSTRUCT" in result.output and "SR" not in result.output.split("objects", 1)[1]

    bad = write(tmp_path, VALID_DESTINATION + 'objects = ["RTSTRUCT", "PDF"]\n')
    result = CliRunner().invoke(app, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2 and "destinations[0] ('tps').objects" in result.output, result.output


def test_storage_commitment_and_roi_prefix_from_toml_in_config_check(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[outputs]\nroi_name_prefix = "AI_"\n\n'
        + VALID_DESTINATION
        + "storage_commitment = true\nstorage_commitment_timeout_s = 600\n"
    )
    settings = load_settings(path, env={})
    assert settings.destination("tps").storage_commitment and settings.outputs.roi_name_prefix == "AI_"
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "AI_GTV_1" in result.output
    assert "on, 600 s" in result.output
