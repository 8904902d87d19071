"""TLS contexts for the Store SCP (server side) and the exporter (client side).

Decisions recorded here:

- TLS 1.2 is the minimum (DICOM PS3.15 BCP 195 profiles); Python's default
  cipher suites otherwise.
- Server: the node presents ``cert_file``/``key_file``. With ``ca_file``, client
  certificates are verified when presented; ``require_client_cert`` refuses
  clients without one (mutual TLS).
- Client: the destination is verified against ``ca_file``, else the system
  trust store, and its certificate must name the host we connect to (DNS name
  or IP address in subjectAltName); the exporter passes that host as
  ``server_hostname``. A client certificate is presented only if configured.
- An unreadable or mismatched certificate/key is a :class:`ConfigError` naming
  the files, so start-up fails with one line instead of a traceback.
"""

from __future__ import annotations

import ssl

from dicom_node.settings import ConfigError, TlsSettings


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The SCP's context, or None when TLS is disabled."""
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, tls)
    if tls.ca_file is not None:
        _load_ca(context, tls)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """An SCU's context for one destination, or None when TLS is disabled."""
    if not tls.enabled:
        return None
    if tls.ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system trust store
    else:
        # Only the configured CA (a department PKI), not every public CA.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies cert and host name
        _load_ca(context, tls)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        _load_identity(context, tls)
    return context


def _load_identity(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls: cannot load certificate {tls.cert_file} with key {tls.key_file}: {exc}") from None


def _load_ca(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls: cannot load CA file {tls.ca_file}: {exc}") from None
