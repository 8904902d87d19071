"""Who is calling the web view, and what their role lets them do.

Decisions:
- Credentials are HTTP basic auth (people, in a browser) or a bearer token
  (scripts, Prometheus). Both are stored only as scrypt hashes
  (``scrypt$n$r$p$salt$hash``, base64), compared in constant time; a verified
  credential is remembered by its SHA-256 so a page load does not pay scrypt
  on every request.
- Roles, in increasing power: ``viewer`` reads everything; ``physicist`` may
  also act on jobs (retry, export, release, cancel) and C-ECHO destinations;
  ``admin`` may do all of that (kept distinct for actions to come).
- Bound to loopback, reading is open to anyone on the host (the anonymous
  viewer); acting always needs a user. Bound elsewhere, everything except
  ``/healthz`` needs a user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import tomllib
from dataclasses import dataclass

from dicom_node.settings.schema import HttpSettings, HttpToken, HttpUser

ROLES = ("viewer", "physicist", "admin")
ACTING_ROLES = frozenset({"physicist", "admin"})
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True)
class User:
    name: str
    role: str
    authenticated: bool = True

    @property
    def can_act(self) -> bool:
        return self.authenticated and self.role in ACTING_ROLES


ANONYMOUS = User(name="anonymous", role="viewer", authenticated=False)


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The stored form of a password or token."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    encode = base64.b64encode
    return f"scrypt${n}${r}${p}${encode(salt).decode()}${encode(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` matches `stored` (a malformed hash matches nothing)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, binascii.Error):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Authenticator:
    """Resolves an Authorization header to a user (or None when it does not verify)."""

    def __init__(self, settings: HttpSettings) -> None:
        users, tokens = list(settings.users), list(settings.tokens)
        if settings.users_file is not None:
            data = tomllib.loads(settings.users_file.read_text())
            users += [HttpUser.model_validate(u) for u in data.get("users", [])]
            tokens += [HttpToken.model_validate(t) for t in data.get("tokens", [])]
        self.users = {u.name: u for u in users}
        self.tokens = tokens
        self.required = not settings.loopback_only
        self._verified: dict[str, User] = {}
        self._decoy = hash_secret(new_token())
        self._lock = threading.Lock()

    @property
    def has_credentials(self) -> bool:
        return bool(self.users or self.tokens)

    def resolve(self, authorization: str | None) -> User | None:
        """The user of a request: ANONYMOUS without a header, None if the header does not verify."""
        if not authorization:
            return ANONYMOUS
        key = hashlib.sha256(authorization.encode()).hexdigest()
        with self._lock:
            if key in self._verified:
                return self._verified[key]
        user = self._check(authorization)
        if user is not None:
            with self._lock:
                self._verified[key] = user
        return user

    def _check(self, authorization: str) -> User | None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            for token in self.tokens:
                if verify_secret(value.strip(), token.token_hash):
                    return User(token.name, token.role)
            return None
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
            user = self.users.get(name)
            if user is None:  # same scrypt cost as for a known name: timing does not reveal user names
                verify_secret(password, self._decoy)
                return None
            if verify_secret(password, user.password_hash):
                return User(user.name, user.role)
        return None
