"""Access tokens (contract section 7): JWTs whose `tasks` claim names the tasks they open.

`issue()` is for the generation service, which knows who owns a task; `Verifier` is the
gateway's side. Keys come only from local configuration (a secret, a PEM file read at start):
nothing is ever fetched over the network, and a token's header cannot choose the key.

Claims:
    tasks   required: a list of task ids (integers, or decimal strings for ids above 2^53,
            which JavaScript cannot hold exactly), or "*" for every task
    exp     required: expiry, in seconds since the epoch
    nbf/iat honoured when present (with the configured leeway, at most 30 s)
    aud/iss checked when the gateway is configured with an audience / issuer
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from taskcast.errors import InvalidParameter
from taskcast.ids import parse_task_id_value

ALL_TASKS = "*"
MAX_TOKEN_BYTES = 8192  # larger tokens are refused before any parsing
MAX_LEEWAY_S = 30.0
JS_SAFE_MAX = 2**53 - 1  # ids above this are written as strings

# HMAC algorithms and the shortest secret each accepts (RFC 7518 section 3.2: the key must be
# at least as long as the hash); a shorter secret simply does not enable that algorithm.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


class TokenRefused(Exception):
    """A token that opens nothing; `reason` is a short fixed word (a metrics label, safe to
    log: it never contains the token)."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class KeyConfigError(ValueError):
    """A key that cannot be used (unreadable PEM file, secret too short, unknown key type)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token opens: `tasks` (or every task) until `expires_at` (Unix
    seconds: the token's `exp` plus the verifier's leeway)."""

    tasks: frozenset[int]
    every_task: bool
    exp: int
    expires_at: float

    def covers(self, task_id: int) -> bool:
        """Whether the token opens this task."""
        return self.every_task or task_id in self.tasks

    def uncovered(self, task_ids: Iterable[int]) -> list[int]:
        """The ids of `task_ids` the token does not open, in order, without repeats."""
        if self.every_task:
            return []
        return [task_id for task_id in dict.fromkeys(task_ids) if task_id not in self.tasks]


def _public_algorithms(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        # One curve, one algorithm: an ES384 signature is never checked against a P-256 key.
        by_curve = {"secp256r1": ("ES256",), "secp384r1": ("ES384",)}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
        raise KeyConfigError(f"unsupported elliptic curve {key.curve.name} "
                             "(use P-256 for ES256 or P-384 for ES384)")
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise KeyConfigError(f"unsupported public key type {type(key).__name__} "
                         "(use RSA, EC P-256/P-384 or Ed25519/Ed448)")


class Verifier:
    """Checks tokens against the configured keys; build it once, at start.

    The algorithm a token may use follows from the key kind, never from the token alone: HS*
    tokens are checked only against the secret, RS*/ES*/EdDSA only against the public key,
    so an HS token signed with the public key's PEM text, `alg: none` and unknown algorithms
    are all refused.
    """

    def __init__(self, *, secret: str | bytes | None = None, public_key_pem: bytes | None = None,
                 audience: str | None = None, issuer: str | None = None,
                 leeway_s: float = 5.0, cache_size: int = 10_000) -> None:
        if secret is None and public_key_pem is None:
            raise KeyConfigError("no key: give a secret and/or a public key")
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise KeyConfigError(f"leeway must be 0..{MAX_LEEWAY_S:g} s, not {leeway_s}")
        self._keys: dict[str, Any] = {}  # algorithm -> key
        if secret is not None:
            raw = secret.encode() if isinstance(secret, str) else secret
            if len(raw) < HMAC_MIN_BYTES["HS256"]:
                raise KeyConfigError(
                    f"the secret is {len(raw)} bytes; HS256 needs at least 32 (RFC 7518 3.2). "
                    "Generate one with: "
                    "python -c 'import secrets; print(secrets.token_urlsafe(48))'")
            for algorithm, minimum in HMAC_MIN_BYTES.items():
                if len(raw) >= minimum:
                    self._keys[algorithm] = raw
        if public_key_pem is not None:
            try:
                key = load_pem_public_key(public_key_pem)
            except (ValueError, TypeError) as exc:
                raise KeyConfigError(f"not a PEM public key: {exc}") from None
            for algorithm in _public_algorithms(key):
                self._keys[algorithm] = key
        self.algorithms = tuple(self._keys)
        # Tokens already verified, to their grants: a poller sends the same token every
        # second, a page reconnects with it. The keys never change while the process runs,
        # so a token that verified once verifies again until it expires (checked on every
        # hit); only accepted tokens are kept. Oldest out first once `cache_size` are held.
        self._verified: dict[str, Grant] = {}
        self.cache_size = cache_size
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway_s = leeway_s

    @classmethod
    def from_files(cls, *, secret: str | None, public_key_file: str | None,
                   audience: str | None = None, issuer: str | None = None,
                   leeway_s: float = 5.0) -> Verifier:
        """The verifier for a secret and/or a PEM file (read now, once)."""
        pem = None
        if public_key_file:
            try:
                pem = Path(public_key_file).read_bytes()
            except OSError as exc:
                raise KeyConfigError(f"cannot read the public key file: {exc}") from None
        return cls(secret=secret or None, public_key_pem=pem, audience=audience,
                   issuer=issuer, leeway_s=leeway_s)

    def verify(self, token: str, remember: bool = False) -> Grant:
        """The token's Grant; raises TokenRefused with the reason otherwise. `remember`
        keeps an accepted token for the next verify (for requests that repeat it: polling;
        a stream verifies once and would only fill the cache)."""
        grant = self._verified.get(token)
        if grant is not None:
            if time.time() < grant.expires_at:
                return grant
            del self._verified[token]
            raise TokenRefused("expired", "token expired")
        grant = self._verify(token)
        if remember and self.cache_size > 0:
            if len(self._verified) >= self.cache_size:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = grant
        return grant

    def _verify(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused("too_large", f"token over {MAX_TOKEN_BYTES} bytes")
        algorithm = _algorithm_of(token)
        if algorithm is None:
            raise TokenRefused("malformed", "not a compact JWS")
        if algorithm not in self._keys:
            raise TokenRefused("algorithm", "algorithm not accepted for the configured keys")
        try:
            claims = jwt.decode(
                token, self._keys[algorithm], algorithms=[algorithm], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("expired", "token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("not_yet_valid", "token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("audience", "wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("issuer", "wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("signature", "bad signature") from None
        except jwt.MissingRequiredClaimError as missing:
            raise TokenRefused("claims", f"the {missing.claim} claim is required") from None
        except jwt.PyJWTError:
            raise TokenRefused("malformed", "malformed token") from None
        exp = int(claims["exp"])
        return Grant(*_tasks_claim(claims.get("tasks")), exp=exp,
                     expires_at=exp + self.leeway_s)


def _algorithm_of(token: str) -> str | None:
    """The `alg` of the token's header ("" if it has none), or None if there is no header.

    Only picks the key to try: jwt.decode then parses the header again, strictly, and refuses
    any algorithm but this one. (jwt.get_unverified_header would parse it strictly twice,
    which was a third of the cost of verifying a token.)"""
    head, dot, _ = token.partition(".")
    if not dot:
        return None
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except ValueError:  # not base64 (binascii.Error), not ASCII, not JSON
        return None
    if not isinstance(header, dict):
        return None
    algorithm = header.get("alg")
    return algorithm if isinstance(algorithm, str) else ""  # "": no algorithm accepted


def _tasks_claim(value: object) -> tuple[frozenset[int], bool]:
    if value is None:
        return frozenset(), False  # a valid token that opens nothing: 403 everywhere
    if value == ALL_TASKS:
        return frozenset(), True
    if not isinstance(value, list):
        raise TokenRefused("claims", 'the tasks claim must be a list of ids or "*"')
    try:
        # The same rule as for ids in WebSocket frames: an int64 >= 0, or its decimal text.
        ids = frozenset(parse_task_id_value(item, ("tasks", index))
                        for index, item in enumerate(value))
    except InvalidParameter as bad:
        raise TokenRefused("claims", f"the tasks claim holds {bad.detail['type']}: "
                           "not a non-negative int64 or its decimal text") from None
    return ids, False


def issue(key: str | bytes | Any, tasks: Iterable[int | str] | Literal["*"], ttl_s: float,
          *, algorithm: str = "HS256", audience: str | None = None, issuer: str | None = None,
          claims: Mapping[str, Any] | None = None, now: float | None = None) -> str:
    """A token that opens `tasks` (ids, or "*" for every task) for `ttl_s` seconds.

    `key` is the gateway's secret for HS256/HS384/HS512, or a private key (PEM text or a
    cryptography key object) for RS*/ES*/EdDSA. Ids above 2^53 are written as decimal
    strings, so JavaScript clients can pass them along unchanged. `claims` adds claims (e.g.
    `sub`); it cannot replace `tasks` or `exp`.
    """
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError("ttl_s must be a positive number of seconds")
    if tasks == ALL_TASKS:
        granted: str | list[int | str] = ALL_TASKS
    elif isinstance(tasks, str):
        raise ValueError('tasks must be task ids or "*"')
    else:
        granted = []
        for index, task_id in enumerate(tasks):
            value = parse_task_id_value(task_id, ("tasks", index))  # InvalidTaskId: ValueError
            granted.append(str(value) if value > JS_SAFE_MAX else value)
        if not granted:
            raise ValueError("a token must name at least one task (or \"*\")")
    moment = time.time() if now is None else now
    payload: dict[str, Any] = dict(claims or {})
    # NumericDate is whole seconds: round exp up, so the token lives at least ttl_s.
    payload.update({"tasks": granted, "iat": int(moment), "exp": math.ceil(moment + ttl_s)})
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    return jwt.encode(payload, key, algorithm=algorithm)
