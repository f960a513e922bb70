"""The gateway's access policy (contract section 7): who may read which task.

With a key configured (TASKCAST_JWT_SECRET and/or TASKCAST_JWT_PUBLIC_KEY_FILE) and auth on,
every task read (REST, SSE, WebSocket) needs a token (tokens.py) that names the task. The
transports ask the Gate, once per request or connection and always before Redis is read:
`authenticate` (401 when it fails) and then `Grant.uncovered` (403). Refusals are counted in
/metrics by transport and reason; neither the token nor its claims are ever logged.

Closed by default: without a key, `taskcast serve` serves a loopback address only, unless auth
is turned off explicitly (TASKCAST_AUTH=off, `--auth off`); see exposure_problem().
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import overload
from urllib.parse import unquote_plus

from starlette.responses import Response
from starlette.types import Scope

from taskcast.metrics import Metrics
from taskcast.responses import envelope
from taskcast.settings import Settings
from taskcast.tokens import Grant, KeyConfigError, TokenRefused, Verifier

logger = logging.getLogger(__name__)

REALM = 'Bearer realm="taskcast"'
_TOKEN_PARAMETER = re.compile(rb"(^|&)token=[^&]*")
AUTH_MODES = ("on", "off")


def _has_key(settings: Settings) -> bool:
    return bool(settings.jwt_secret or settings.jwt_public_key_file)


def verifier_for(settings: Settings) -> Verifier | None:
    """The verifier the settings ask for, or None when tasks are open (auth off, or no key).
    Raises KeyConfigError for a setting that cannot work (an unreadable key, say)."""
    if settings.auth not in AUTH_MODES:
        raise KeyConfigError(f"TASKCAST_AUTH must be 'on' or 'off', not {settings.auth!r}")
    if settings.auth == "off" or not _has_key(settings):
        return None
    return Verifier.from_files(
        secret=settings.jwt_secret or None, public_key_file=settings.jwt_public_key_file or None,
        audience=settings.jwt_audience or None, issuer=settings.jwt_issuer or None,
        leeway_s=settings.jwt_leeway_s)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(settings: Settings) -> str | None:
    """Why `taskcast serve` must refuse to start with these settings, or None: every task
    would be open to the network (no key, auth not turned off, a non-loopback address)."""
    if settings.auth == "off" or _has_key(settings) or is_loopback(settings.host):
        return None
    return (f"refusing to serve {settings.host}:{settings.port} with no access control: "
            "anyone who can reach it could read every task and image. Either configure a "
            "key (TASKCAST_JWT_SECRET, at least 32 bytes, or TASKCAST_JWT_PUBLIC_KEY_FILE) "
            "so that reads need a token, or turn auth off explicitly (TASKCAST_AUTH=off or "
            "--auth off), e.g. behind a proxy that does its own checks.")


def describe(settings: Settings) -> str:
    """What access control these settings give, for the start-up log line (names no key)."""
    if settings.auth == "off":
        return "off (TASKCAST_AUTH=off: every task is open to whoever reaches the gateway)"
    if not _has_key(settings):
        return "none configured (no key: every task is open; loopback only)"
    kinds = [name for name, value in (("HS secret", settings.jwt_secret),
                                      ("public key", settings.jwt_public_key_file)) if value]
    return "tokens required (" + ", ".join(kinds) + ")"


class Gate:
    """The transports' one question: which tasks does this request's token open?"""

    def __init__(self, verifier: Verifier, metrics: Metrics) -> None:
        self.verifier = verifier
        self.metrics = metrics

    @overload
    def authenticate(self, scope: Scope, transport: str) -> Grant: ...

    @overload
    def authenticate(self, scope: Scope, transport: str, *, required: bool) -> Grant | None: ...

    def authenticate(self, scope: Scope, transport: str, *, required: bool = True
                     ) -> Grant | None:
        """The Grant of the request's token (`Authorization: Bearer`, which wins, else the
        `token` query parameter); raises TokenRefused (counted) otherwise. A request without
        a token gives None when it is not `required` (/ws: a token may come in a frame).
        REST requests repeat their token (a poller's every second): the verifier remembers
        those."""
        try:
            token = token_of(scope)
            if token is None:
                if not required:
                    return None
                raise TokenRefused("missing", "no token")
            return self.verifier.verify(token, remember=transport == "rest")
        except TokenRefused as refusal:
            self.refused(transport, refusal.reason)
            raise

    def verify(self, token: object, transport: str) -> Grant:
        """The Grant of a token given in a frame; raises TokenRefused (counted) otherwise."""
        try:
            if not isinstance(token, str) or not token:
                raise TokenRefused("missing", "no token")
            return self.verifier.verify(token)
        except TokenRefused as refusal:
            self.refused(transport, refusal.reason)
            raise

    def refused(self, transport: str, reason: str) -> None:
        """Count a refusal (reasons: the TokenRefused ones, `forbidden`, `expired_in_use`,
        `no_token_in_time`); logged at debug level without the token."""
        self.metrics.auth_refusals.labels(transport, reason).inc()
        logger.debug("%s: access refused (%s)", transport, reason)


def token_of(scope: Scope) -> str | None:
    """The token a request presents, or None; raises TokenRefused for an ambiguous one. A
    token found in the query string is replaced there with `[redacted]`."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    query: bytes = scope.get("query_string", b"")
    if b"token=" not in query:
        return None
    # Only a parameter spelled `token` counts, not an escaped name such as `%74oken`: what
    # log redaction recognises is then exactly what the gateway accepts.
    tokens = [unquote_plus(value.decode("latin-1")) for name, _, value in
              (part.partition(b"=") for part in query.split(b"&")) if name == b"token"]
    if len(tokens) > 1:
        raise TokenRefused("malformed", "more than one token parameter")
    if tokens:
        # Read once: what stays in the request (for access logs, for the connection's whole
        # life) no longer holds it.
        scope["query_string"] = _TOKEN_PARAMETER.sub(rb"\1token=[redacted]", query)
    return str(tokens[0]) if tokens else None


def unauthorized(refusal: TokenRefused) -> Response:
    """401 with the contract's body and a WWW-Authenticate challenge (RFC 6750)."""
    challenge = REALM if refusal.reason == "missing" else (
        f'{REALM}, error="invalid_token", error_description="{refusal.description}"')
    return envelope(401, "unauthorized", headers={"WWW-Authenticate": challenge})


def forbidden() -> Response:
    """403 with the contract's body: the token is valid but does not name every task."""
    return envelope(403, "forbidden",
                    headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope"'})


def http_grant(gate: Gate | None, scope: Scope, transport: str) -> Grant | Response | None:
    """For REST and SSE: None when tasks are open, else the request's Grant, or the 401
    response to send."""
    if gate is None:
        return None
    try:
        return gate.authenticate(scope, transport)
    except TokenRefused as refusal:
        return unauthorized(refusal)


def http_forbidden(gate: Gate | None, grant: Grant | None, task_ids: list[int],
                   transport: str) -> Response | None:
    """For REST and SSE: the 403 response when the grant does not open every id, else None."""
    if gate is None or grant is None or not grant.uncovered(task_ids):
        return None
    gate.refused(transport, "forbidden")
    return forbidden()
