"""The configuration schema: every section and key, its type, default and checks (pydantic).

The loader (`loader.py`) reads TOML and the environment into it.

Decisions recorded here:

- Sources, lowest to highest precedence: built-in defaults, the TOML file
  (``path`` argument, else ``$DICOM_NODE_CONFIG``), then environment overrides
  ``DICOM_NODE__SECTION__KEY=value`` (``__`` separates levels, names are
  case-insensitive except the DICOM keywords under ``match``; a numeric level
  indexes a list, e.g. ``DICOM_NODE__DESTINATIONS__0__HOST``). A value is parsed as TOML when it is a
  quoted string, an array or an inline table; otherwise it is kept as text and
  pydantic converts it to the field's type (so ``DICOM_NODE__NODE__PORT=11200``
  is an int, while an AE title ``123`` stays the string ``"123"``). An empty
  value removes the key, restoring its built-in default.
- Every model forbids unknown keys: a typo is an error, never silently ignored.
- Every problem surfaces as one :class:`ConfigError` whose one-line message names
  the file (or environment variable) and the dotted key, e.g.
  ``config/node.toml: node.port: Input should be less than or equal to 65535 (got 70000)``.
- Relative paths (``storage.data_dir``, TLS files) are resolved against the
  current working directory when the settings are built, and stored absolute.
  So ``dicom-node serve --config config/node.example.toml`` run from the
  repository root keeps its data under ``./var/``; under systemd the unit's
  ``WorkingDirectory`` plays that role.
- Routing patterns (``rules[].match``) are anchored: ``"MR"`` means the whole
  value is ``MR``. A pattern starting with ``~`` is searched instead (``"~T1"``
  matches any value containing ``T1``). Patterns are case-sensitive; write
  ``(?i)`` for case-insensitive matching. Keys are DICOM keywords (``Modality``,
  ``SeriesDescription``), checked against pydicom's dictionary. Regexes are
  compiled here so a broken rule stops start-up with its name in the message.
- TLS: the node's own TLS (``node.tls``) needs a certificate and key when
  enabled. For a destination, the client certificate is optional (sent only if
  configured, both or neither) and ``ca_file`` None means the system trust store.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from storage.ingest import ConflictPolicy
from storage.jobs import DEFAULT_LEASE_S

# Inference devices: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"

ENV_CONFIG_PATH = "DICOM_NODE_CONFIG"
ENV_PREFIX = "DICOM_NODE__"
SEARCH_PREFIX = "~"
# Sequences and binary values cannot be matched as text by a routing pattern.
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW"})


# Multi-frame MR: no job can use it (the volume loader reads one frame per instance), so it is
# refused at negotiation rather than stored and left unprocessed.
_MULTI_FRAME_REASON = "multi-frame MR is not processed by this node (enhanced per-frame geometry is not read)"
REFUSED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": _MULTI_FRAME_REASON,  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3": _MULTI_FRAME_REASON,  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4": _MULTI_FRAME_REASON,  # Legacy Converted Enhanced MR Image Storage
}


class ConfigError(Exception):
    """Invalid configuration; the message names the source and the key(s)."""


def _check_ae_title(value: str) -> str:
    """DICOM AE title (PS3.5 VR AE): 1-16 characters, no backslash or control
    characters, not only spaces. Surrounding spaces are insignificant and removed."""
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or only spaces")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is longer than 16 characters")
    if "\\" in stripped or any(ord(c) < 32 or ord(c) == 127 for c in stripped):
        raise ValueError(f"AE title {stripped!r} contains a backslash or control character")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _absolute(path: Path | None) -> Path | None:
    """Resolve a relative path against the current working directory (the
    documented contract), without following symlinks."""
    if path is None:
        return None
    return Path(os.path.abspath(path.expanduser()))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """TLS for the SCP (``node.tls``) or for one destination's SCU."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    _absolute_paths = field_validator("cert_file", "key_file", "ca_file")(_absolute)

    @model_validator(mode="after")
    def _check_files(self) -> TlsSettings:
        if not self.enabled:
            return self
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        for name in ("cert_file", "key_file", "ca_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist or is not a file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file to verify client certificates")
        return self


class NodeSettings(_Section):
    """The node's own DICOM identity, listener and association policy."""

    ae_title: AETitle = "DICOMNODE"
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=11112, ge=0, le=65535)  # 0: the OS picks a free port
    max_associations: int = Field(default=10, ge=1)
    allowed_calling_aets: list[AETitle] = []
    allowed_source_addresses: list[str] = []
    acse_timeout_s: float = Field(default=30, gt=0)
    dimse_timeout_s: float = Field(default=60, gt=0)
    network_timeout_s: float = Field(default=60, gt=0)
    min_free_disk_mb: int = Field(default=500, ge=0)
    max_instance_mb: float = Field(default=512, gt=0)
    max_pdu_kb: int = Field(default=1024, ge=16, le=65536)
    accepted_sop_classes: list[str] = Field(default=["MRImageStorage"], validate_default=True)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("accepted_sop_classes")
    @classmethod
    def _check_sop_classes(cls, values: list[str]) -> list[str]:
        """Keywords or UIDs of storage SOP classes, stored as UIDs; multi-frame MR is refused (see REFUSED_SOP_CLASSES)."""
        from pynetdicom import sop_class

        storage = {str(uid): name for name, uid in sop_class._STORAGE_CLASSES.items()}
        by_keyword = {name: uid for uid, name in storage.items()}
        uids = []
        for value in values:
            uid = by_keyword.get(value, value)
            if uid not in storage:
                raise ValueError(f"{value!r} is not a storage SOP class keyword or UID (e.g. 'MRImageStorage')")
            if uid in REFUSED_SOP_CLASSES:
                raise ValueError(f"{storage[uid]} cannot be accepted: {REFUSED_SOP_CLASSES[uid]}")
            uids.append(uid)
        if not uids:
            raise ValueError("at least one SOP class must be accepted")
        return uids

    @field_validator("allowed_source_addresses")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
        return values

    @model_validator(mode="after")
    def _server_tls_needs_certificate(self) -> NodeSettings:
        if self.tls.enabled and self.tls.cert_file is None:
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file for the SCP")
        return self

    def is_calling_aet_allowed(self, ae_title: str) -> bool:
        """Association policy: an empty allow-list admits every calling AE."""
        return not self.allowed_calling_aets or ae_title.strip(" ") in self.allowed_calling_aets

    def is_source_allowed(self, address: str) -> bool:
        """Association policy: an empty allow-list admits every source address."""
        if not self.allowed_source_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        networks = (ipaddress.ip_network(n, strict=False) for n in self.allowed_source_addresses)
        return any(ip in network for network in networks)


class StorageSettings(_Section):
    """Where instances, outputs and the job database live, and for how long."""

    data_dir: Path = Field(default=Path("var"), validate_default=True)
    database_url: str | None = None
    retention_days: float | None = Field(default=None, gt=0)  # None: keep forever
    retention_check_interval_min: float = Field(default=60, gt=0)
    # After retention: drop patient names, replace patient IDs by keyed pseudonyms in the kept history.
    pseudonymise_after_retention: bool = False
    # A re-sent instance with other content (a correction): "keep-first" keeps the first version in use,
    # "replace" makes the new one the instance; the other is kept under conflicts/ (storage/ingest.py).
    conflict_policy: ConflictPolicy = ConflictPolicy.KEEP_FIRST

    _absolute_data_dir = field_validator("data_dir")(_absolute)

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if value is not None:
            try:
                make_url(value)
            except ArgumentError:
                raise ValueError("not a valid SQLAlchemy database URL") from None
        return value

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, else a SQLite file inside the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir}/dicom-node.db"


# `[series] partial_quiet_period_s` by default. It is never shorter than `quiet_period_s`: a longer
# quiet_period_s (an older file's 300 s, a test's 600 s) raises it, so such files stay valid.
DEFAULT_PARTIAL_QUIET_PERIOD_S = 120.0


class SeriesSettings(_Section):
    """Series completion (`dicom_node.series_watcher`): a short quiet period after the delivery
    ended, a long one for a series that looks incomplete."""

    quiet_period_s: float = Field(default=5, gt=0)
    partial_quiet_period_s: float = Field(default=DEFAULT_PARTIAL_QUIET_PERIOD_S, gt=0)
    check_interval_s: float = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _partial_not_shorter(self) -> SeriesSettings:
        self.partial_quiet_period_s = max(self.partial_quiet_period_s, self.quiet_period_s)
        return self


# The output objects the node writes, as named in a destination's `objects` filter.
OutputKind = Literal["RTSTRUCT", "SR", "SEG"]
OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)


class Destination(_Section):
    """A C-STORE SCP (PACS, TPS) that receives the node's results."""

    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None  # None: the node's own ae_title
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # Which outputs it receives: a TPS may take only ["RTSTRUCT"], a PACS ["RTSTRUCT", "SR"].
    objects: list[OutputKind] = Field(default_factory=lambda: list(OUTPUT_KINDS), min_length=1)
    # Storage Commitment (PS3.4 Annex J): after the C-STOREs, ask the destination to commit them
    # (N-ACTION) and count an object delivered only once its N-EVENT-REPORT says committed.
    storage_commitment: bool = False
    # How long the association stays open for a report on it; after that the report is
    # expected on a new association to the node's own port.
    storage_commitment_wait_s: float = Field(default=5, ge=0)
    # No report within this time: the objects' exports fail (re-send with `dicom-node jobs export`).
    storage_commitment_timeout_s: float = Field(default=3600, gt=0)

    def wants(self, kind: str) -> bool:
        """Whether outputs of `kind` (RTSTRUCT, SR, SEG) are sent here; others get no export row."""
        return kind in self.objects


class ScreeningNames(_Section):
    """A rule's own series names for the post-contrast T1 screening (``rules.screening``):
    regexes searched case-insensitively in SeriesDescription and ProtocolName. ``refuse``
    refuses; ``accept`` accepts, before the built-in names (sequence parameters still apply)."""

    accept: list[str] = []
    refuse: list[str] = []

    @field_validator("accept", "refuse")
    @classmethod
    def _check_regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r} ({exc})") from None
        return patterns


class RoutingRule(_Section):
    """Which series a model runs on and where its results go (see module docstring
    for the pattern syntax)."""

    name: str = Field(min_length=1)
    model: str = Field(default="default", min_length=1)
    match: dict[str, str] = {}
    destinations: list[str] = []
    screening: ScreeningNames = Field(default_factory=ScreeningNames)

    @model_validator(mode="after")
    def _check_patterns(self) -> RoutingRule:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        for keyword, pattern in self.match.items():
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"match: {keyword!r} is not a DICOM keyword")
            if dictionary_VR(tag) in _UNMATCHABLE_VRS:
                raise ValueError(f"match: {keyword} ({dictionary_VR(tag)}) has no text value to match")
            try:
                re.compile(pattern.removeprefix(SEARCH_PREFIX))
            except re.error as exc:
                raise ValueError(f"match.{keyword}: invalid regex {pattern!r} ({exc})") from None
        return self


class WorkerSettings(_Section):
    """Inference workers in this process (0: workers run on other hosts)."""

    count: int = Field(default=1, ge=0)
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    batch_size: int = Field(default=8, ge=1)
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Tries per job before it fails for good: internal errors and workers that died mid-job
    # re-queue it until then (see storage.jobs); a refused series fails at once.
    max_attempts: int = Field(default=3, ge=1)
    # A running job's lease: renewed every lease_s / 3 by its worker; once expired, the job is re-queued.
    lease_s: float = Field(default=DEFAULT_LEASE_S, ge=1)

    @property
    def lease_check_interval_s(self) -> float:
        """How often expired leases are looked for (a dead holder's job waits at most lease_s + this)."""
        return self.lease_s / 3


class ExportSettings(_Section):
    """C-STORE SCU retries: exponential backoff, then give up (job failed)."""

    retry_initial_s: float = Field(default=5, gt=0)
    retry_max_interval_s: float = Field(default=300, gt=0)
    give_up_after_s: float = Field(default=86400, gt=0)

    @model_validator(mode="after")
    def _check_order(self) -> ExportSettings:
        if self.retry_max_interval_s < self.retry_initial_s:
            raise ValueError("retry_max_interval_s must be >= retry_initial_s")
        return self


class OutputSettings(_Section):
    """How the DICOM outputs are written for the receiving systems (TPS naming conventions)."""

    # Put before each RTSTRUCT ROI name (GTV_1, GTV_2, ...), e.g. "AI_"; prefix + "GTV_99" <= 16 characters.
    roi_name_prefix: str = ""

    @field_validator("roi_name_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        from inference.outputs.rtstruct import check_roi_name_prefix

        return check_roi_name_prefix(value)


class LoggingSettings(_Section):
    """Log rendering; ``auto`` means JSON unless stderr is a terminal."""

    format: Literal["auto", "json", "console"] = "auto"
    level: str = "INFO"
    log_patient_names: bool = False

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        return level


HttpRole = Literal["viewer", "physicist", "admin"]


class HttpUser(_Section):
    """A basic-auth user of the web view; ``password_hash`` from ``dicom-node http hash-password``."""

    name: str = Field(min_length=1, pattern=r"^[^:\s]+$")
    role: HttpRole = "viewer"
    password_hash: str = Field(pattern=r"^scrypt\$")


class HttpToken(_Section):
    """A bearer token (for scripts and Prometheus); ``token_hash`` from ``dicom-node http new-token``."""

    name: str = Field(min_length=1)
    role: HttpRole = "viewer"
    token_hash: str = Field(pattern=r"^scrypt\$")


class HttpSettings(_Section):
    """The operations view: web pages, JSON API, /metrics, /healthz and /readyz.

    Off unless enabled. Bound to a non-loopback address, every path except
    ``/healthz`` needs a user or token, so one must be configured (here or in
    ``users_file``, a TOML file with the same ``[[users]]``/``[[tokens]]`` tables).
    ``tls = true`` serves HTTPS with the node's certificate (``node.tls``).
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)  # 0: the OS picks a free port
    tls: bool = False
    users: list[HttpUser] = []
    tokens: list[HttpToken] = []
    users_file: Path | None = None

    _absolute_users_file = field_validator("users_file")(_absolute)

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @model_validator(mode="after")
    def _check_auth(self) -> HttpSettings:
        if self.users_file is not None and not self.users_file.is_file():
            raise ValueError(f"users_file {str(self.users_file)!r} does not exist or is not a file")
        if self.enabled and not self.loopback_only and not (self.users or self.tokens or self.users_file):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: configure users, tokens or users_file"
                " (everything but /healthz then needs authentication)"
            )
        return self


class Settings(_Section):
    """The whole node configuration (TOML ``[[destinations]]`` and ``[[rules]]``)."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    destinations: list[Destination] = []
    rules: list[RoutingRule] = []

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        _check_unique("destinations", [d.name for d in self.destinations])
        _check_unique("rules", [r.name for r in self.rules])
        known = {d.name for d in self.destinations}
        for index, rule in enumerate(self.rules):
            unknown = [name for name in rule.destinations if name not in known]
            if unknown:
                raise ValueError(
                    f"rules[{index}] ({rule.name!r}).destinations: unknown destination(s)"
                    f" {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})"
                )
        if self.http.enabled and self.http.tls and not self.node.tls.enabled:
            raise ValueError("http.tls uses the node's certificate: enable node.tls with cert_file and key_file")
        return self

    def destination(self, name: str) -> Destination:
        """The destination called ``name`` (names are validated unique)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


def _check_unique(section: str, names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{section}[].name: duplicate name(s) {', '.join(duplicates)}")
