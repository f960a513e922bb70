"""Access tokens (contract section 7), without a server: tokens.issue(), tokens.Verifier and
the Grant it returns, and the request-side helpers of access.py (token_of, is_loopback,
exposure_problem, verifier_for).

Every refusal is checked by its reason, the short word /metrics counts it under. Tokens the
issuer would never mint (`alg: none`, an HS token keyed with the public key's PEM text, an HS384
signature with a short secret) are built by hand, byte by byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519

from taskcast.access import exposure_problem, is_loopback, token_of, verifier_for
from taskcast.settings import Settings
from taskcast.tokens import (
    ALL_TASKS,
    MAX_TOKEN_BYTES,
    Grant,
    KeyConfigError,
    TokenRefused,
    Verifier,
    issue,
)

SECRET = "s" * 64  # HS256, HS384 and HS512
SECRET_32 = "t" * 32  # HS256 only
OTHER_SECRET = "o" * 64
INT64_MAX = 2**63 - 1
JS_SAFE_MAX = 2**53 - 1


# -- keys and hand-made tokens -------------------------------------------------------------------


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def private_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return pem


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
ED448_KEY = ed448.Ed448PrivateKey.generate()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes | None,
              digest: Callable[..., Any] = hashlib.sha256) -> str:
    """A compact JWS built without PyJWT (which refuses to mint some of these): HMAC-signed
    with `key`, or with an empty signature when `key` is None."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"tasks": [1], "iat": now, "exp": now + 60, **extra}


def unverified(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


def refusal(verifier: Verifier, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token)
    # the reason and description are logged and counted: never the token or the key
    assert SECRET not in str(caught.value)
    assert not token or token not in caught.value.description
    return caught.value.reason


# -- issue() -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "signing_key", "pem", "secret"), [
    ("HS256", SECRET_32, None, SECRET_32),
    ("HS384", SECRET, None, SECRET),
    ("HS512", SECRET, None, SECRET),
    ("RS256", RSA_KEY, public_pem(RSA_KEY), None),
    ("RS384", private_pem(RSA_KEY).decode(), public_pem(RSA_KEY), None),
    ("RS512", private_pem(RSA_KEY), public_pem(RSA_KEY), None),
    ("ES256", P256_KEY, public_pem(P256_KEY), None),
    ("ES384", private_pem(P384_KEY), public_pem(P384_KEY), None),
    ("EdDSA", ED25519_KEY, public_pem(ED25519_KEY), None),
    ("EdDSA", private_pem(ED448_KEY), public_pem(ED448_KEY), None),
])
def test_issue_round_trips_through_the_verifier(algorithm: str, signing_key: Any,
                                                pem: bytes | None, secret: str | None) -> None:
    before = time.time()
    token = issue(signing_key, [7, "8", 7], 60, algorithm=algorithm)
    grant = Verifier(secret=secret, public_key_pem=pem, leeway_s=0).verify(token)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert grant.tasks == frozenset({7, 8})
    assert not grant.every_task
    assert grant.covers(7) and grant.covers(8) and not grant.covers(9)
    payload = unverified(token)
    assert payload["tasks"] == [7, 8, 7]
    assert grant.exp == payload["exp"]
    assert before + 60 <= grant.exp <= math.ceil(time.time() + 60)
    assert grant.expires_at == grant.exp  # leeway 0
    assert int(before) <= payload["iat"] <= time.time()


def test_issue_writes_ids_above_2_53_as_decimal_strings() -> None:
    ids = [0, JS_SAFE_MAX, JS_SAFE_MAX + 1, INT64_MAX, "42", str(2**60 + 3)]
    token = issue(SECRET, ids, 60)
    assert unverified(token)["tasks"] == [
        0, JS_SAFE_MAX, str(JS_SAFE_MAX + 1), str(INT64_MAX), 42, str(2**60 + 3)]
    grant = Verifier(secret=SECRET).verify(token)
    assert grant.tasks == frozenset({0, JS_SAFE_MAX, JS_SAFE_MAX + 1, INT64_MAX, 42, 2**60 + 3})


def test_issue_star_opens_every_task() -> None:
    token = issue(SECRET, ALL_TASKS, 60)
    assert unverified(token)["tasks"] == "*"
    grant = Verifier(secret=SECRET).verify(token)
    assert grant.every_task
    assert grant.covers(0) and grant.covers(INT64_MAX)
    assert grant.uncovered([1, 2, INT64_MAX]) == []


def test_issue_rounds_exp_up_to_whole_seconds_and_sets_aud_iss() -> None:
    token = issue(SECRET, [1], 10, now=1000.2, audience="aud-1", issuer="iss-1")
    payload = unverified(token)
    assert payload["iat"] == 1000
    assert payload["exp"] == 1011  # ceil(1010.2): the token lives at least ttl_s
    assert payload["aud"] == "aud-1"
    assert payload["iss"] == "iss-1"
    assert issue(SECRET, [1], 10, now=1000.0) != token
    assert unverified(issue(SECRET, [1], 10, now=1000.0))["exp"] == 1010


@pytest.mark.parametrize("ttl", [0, -1, -0.001, math.nan, math.inf, -math.inf])
def test_issue_refuses_a_ttl_that_is_not_a_positive_number(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        issue(SECRET, [1], ttl)


@pytest.mark.parametrize("tasks", [
    [], "7", "", "**", [-1], [INT64_MAX + 1], ["abc"], ["-1"], [" 7"], ["1_0"], [True],
    [1.5], [2.0], [None],
], ids=repr)
def test_issue_refuses_values_that_are_not_task_ids(tasks: Any) -> None:
    # A token the gateway would refuse (its tasks claim malformed) must not be minted.
    with pytest.raises((ValueError, TypeError)):
        issue(SECRET, tasks, 60)


def test_extra_claims_are_added_but_cannot_replace_tasks_exp_or_iat() -> None:
    token = issue(SECRET, [5], 60, now=2000.0, claims={
        "sub": "u1", "tasks": "*", "exp": 9_999_999_999, "iat": 1, "scope": ["a"]})
    payload = unverified(token)
    assert payload["sub"] == "u1"
    assert payload["scope"] == ["a"]
    assert payload["tasks"] == [5]
    assert payload["exp"] == 2060
    assert payload["iat"] == 2000


# -- Verifier: keys ------------------------------------------------------------------------------


def test_the_secret_length_decides_the_hmac_algorithms() -> None:
    assert Verifier(secret="a" * 32).algorithms == ("HS256",)
    assert Verifier(secret="a" * 47).algorithms == ("HS256",)
    assert Verifier(secret="a" * 48).algorithms == ("HS256", "HS384")
    assert Verifier(secret=b"a" * 63).algorithms == ("HS256", "HS384")
    assert Verifier(secret="a" * 64).algorithms == ("HS256", "HS384", "HS512")
    # bytes are counted, not characters
    assert Verifier(secret="é" * 16).algorithms == ("HS256",)


@pytest.mark.parametrize(("private_key", "algorithms"), [
    (RSA_KEY, ("RS256", "RS384", "RS512")),
    (P256_KEY, ("ES256",)),
    (P384_KEY, ("ES384",)),
    (ED25519_KEY, ("EdDSA",)),
    (ED448_KEY, ("EdDSA",)),
])
def test_the_public_key_kind_decides_the_algorithms(private_key: Any,
                                                    algorithms: tuple[str, ...]) -> None:
    assert Verifier(public_key_pem=public_pem(private_key)).algorithms == algorithms
    both = Verifier(secret=SECRET, public_key_pem=public_pem(private_key)).algorithms
    assert set(both) == {"HS256", "HS384", "HS512", *algorithms}


@pytest.mark.parametrize("secret", ["", "x", "x" * 31, b"x" * 31, "é" * 15])
def test_a_short_secret_is_a_key_config_error(secret: str | bytes) -> None:
    with pytest.raises(KeyConfigError):
        Verifier(secret=secret)


def test_no_key_is_a_key_config_error() -> None:
    with pytest.raises(KeyConfigError, match="no key"):
        Verifier()


@pytest.mark.parametrize("pem", [
    b"",
    b"not a pem",
    b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    private_pem(RSA_KEY),  # the private half is not a public key
], ids=["empty", "text", "garbage-pem", "private-key"])
def test_a_bad_pem_is_a_key_config_error(pem: bytes) -> None:
    with pytest.raises(KeyConfigError):
        Verifier(public_key_pem=pem)


@pytest.mark.parametrize("private_key", [
    ec.generate_private_key(ec.SECP521R1()),
    ec.generate_private_key(ec.SECP256K1()),
    x25519.X25519PrivateKey.generate(),
    x448.X448PrivateKey.generate(),
], ids=["P-521", "secp256k1", "X25519", "X448"])
def test_an_unsupported_key_is_a_key_config_error(private_key: Any) -> None:
    with pytest.raises(KeyConfigError, match="unsupported"):
        Verifier(public_key_pem=public_pem(private_key))


@pytest.mark.parametrize("leeway", [-1, -0.001, 30.001, 31, 3600, math.nan])
def test_a_leeway_outside_0_to_30_s_is_a_key_config_error(leeway: float) -> None:
    with pytest.raises(KeyConfigError, match="leeway"):
        Verifier(secret=SECRET, leeway_s=leeway)


@pytest.mark.parametrize("leeway", [0, 5, 30])
def test_a_leeway_within_0_to_30_s_is_accepted(leeway: float) -> None:
    assert Verifier(secret=SECRET, leeway_s=leeway).leeway_s == leeway


def test_from_files_reads_the_pem_once_and_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(P256_KEY))
    verifier = Verifier.from_files(secret=None, public_key_file=str(path), leeway_s=0)
    path.unlink()  # read at start: the file is no longer needed
    assert verifier.verify(issue(P256_KEY, [3], 60, algorithm="ES256")).tasks == {3}
    with pytest.raises(KeyConfigError, match="cannot read"):
        Verifier.from_files(secret=None, public_key_file=str(path))
    with pytest.raises(KeyConfigError, match="no key"):
        Verifier.from_files(secret="", public_key_file="")


# -- Verifier: refusals --------------------------------------------------------------------------


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(secret=SECRET, public_key_pem=public_pem(RSA_KEY), leeway_s=0)


@pytest.mark.parametrize("token", [
    "", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9.!!!.xyz",
    b64json([1]) + "." + b64json({}) + ".",  # a header that is not an object
])
def test_a_malformed_token_is_refused_as_malformed(verifier: Verifier, token: str) -> None:
    assert refusal(verifier, token) == "malformed"


def test_a_payload_that_is_not_an_object_is_malformed(verifier: Verifier) -> None:
    signing_input = f"{b64json({'alg': 'HS256'})}.{b64url(b'[1, 2]')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert refusal(verifier, f"{signing_input}.{b64url(signature)}") == "malformed"


def test_a_bad_signature_is_refused(verifier: Verifier) -> None:
    assert refusal(verifier, issue(OTHER_SECRET, [1], 60)) == "signature"
    assert refusal(verifier, issue(OTHER_RSA_KEY, [1], 60, algorithm="RS256")) == "signature"
    # the payload changed after signing: tasks [1] became "*"
    header, _, signature = issue(SECRET, [1], 60).split(".")
    assert refusal(verifier, f"{header}.{b64json(claims(tasks='*'))}.{signature}") == "signature"


def test_a_key_in_the_token_header_is_never_used(verifier: Verifier) -> None:
    # The attacker signs with a key of their own and ships its public half in the header.
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
    token = jwt.encode(claims(tasks="*"), attacker, algorithm="RS256",
                       headers={"jwk": jwk, "kid": "attacker"})
    assert refusal(verifier, token) == "signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(verifier: Verifier, alg: str) -> None:
    token = hand_made({"alg": alg, "typ": "JWT"}, claims(tasks="*"), None)
    assert refusal(verifier, token) == "algorithm"
    # also with a (meaningless) signature segment
    assert refusal(verifier, token + "c2ln") == "algorithm"


def test_a_header_without_a_string_alg_is_refused(verifier: Verifier) -> None:
    for header in ({"typ": "JWT"}, {"alg": 256}, {"alg": None}, {"alg": ["HS256"]}):
        token = hand_made(header, claims(), SECRET.encode())
        assert refusal(verifier, token) == "algorithm"


@pytest.mark.parametrize("alg", ["XS256", "HS1", "PS256", "ES512", "hs256"])
def test_unknown_or_unconfigured_algorithms_are_refused(verifier: Verifier, alg: str) -> None:
    assert refusal(verifier, hand_made({"alg": alg}, claims(), SECRET.encode())) == "algorithm"


def test_an_hs_token_keyed_with_the_public_key_pem_is_refused() -> None:
    pem = public_pem(RSA_KEY)
    token = hand_made({"alg": "HS256", "typ": "JWT"}, claims(tasks="*"), pem)
    only_public = Verifier(public_key_pem=pem, leeway_s=0)
    assert refusal(only_public, token) == "algorithm"
    both = Verifier(secret=SECRET, public_key_pem=pem, leeway_s=0)
    assert refusal(both, token) == "signature"  # HS* is checked against the secret only
    # the same with the PEM text stripped of its final newline, as some tools do
    assert refusal(only_public, hand_made({"alg": "HS256"}, claims(), pem.strip())) == "algorithm"


def test_an_hmac_algorithm_the_secret_is_too_short_for_is_refused() -> None:
    verifier = Verifier(secret=SECRET_32, leeway_s=0)
    key = SECRET_32.encode()
    assert verifier.verify(hand_made({"alg": "HS256"}, claims(), key)).tasks == {1}
    assert refusal(verifier, hand_made({"alg": "HS384"}, claims(), key, hashlib.sha384)) == \
        "algorithm"
    assert refusal(verifier, hand_made({"alg": "HS512"}, claims(), key, hashlib.sha512)) == \
        "algorithm"


def test_a_signature_of_another_curve_or_key_kind_is_refused() -> None:
    p256 = Verifier(public_key_pem=public_pem(P256_KEY), leeway_s=0)
    assert refusal(p256, issue(P384_KEY, [1], 60, algorithm="ES384")) == "algorithm"
    assert refusal(p256, issue(RSA_KEY, [1], 60, algorithm="RS256")) == "algorithm"
    assert refusal(p256, issue(SECRET, [1], 60)) == "algorithm"
    assert refusal(p256, issue(ED25519_KEY, [1], 60, algorithm="EdDSA")) == "algorithm"
    # ES256 by a different P-256 key
    other = ec.generate_private_key(ec.SECP256R1())
    assert refusal(p256, issue(other, [1], 60, algorithm="ES256")) == "signature"
    eddsa = Verifier(public_key_pem=public_pem(ED25519_KEY), leeway_s=0)
    assert refusal(eddsa, issue(ED448_KEY, [1], 60, algorithm="EdDSA")) == "signature"
    secret_only = Verifier(secret=SECRET, leeway_s=0)
    assert refusal(secret_only, issue(RSA_KEY, [1], 60, algorithm="RS256")) == "algorithm"


def test_expiry_is_checked_with_the_leeway() -> None:
    now = int(time.time())
    strict = Verifier(secret=SECRET, leeway_s=0)
    lenient = Verifier(secret=SECRET, leeway_s=30)
    expired_10s_ago = jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256")
    assert refusal(strict, expired_10s_ago) == "expired"
    grant = lenient.verify(expired_10s_ago)
    assert grant.exp == now - 10
    assert grant.expires_at == now - 10 + 30  # exp plus the leeway
    assert refusal(lenient, jwt.encode(claims(exp=now - 40), SECRET, algorithm="HS256")) == \
        "expired"
    assert refusal(strict, jwt.encode(claims(exp=now), SECRET, algorithm="HS256")) == "expired"


def test_not_before_and_issued_at_in_the_future_are_refused_beyond_the_leeway() -> None:
    now = int(time.time())
    strict = Verifier(secret=SECRET, leeway_s=0)
    lenient = Verifier(secret=SECRET, leeway_s=30)
    nbf_soon = jwt.encode(claims(nbf=now + 20), SECRET, algorithm="HS256")
    assert refusal(strict, nbf_soon) == "not_yet_valid"
    assert lenient.verify(nbf_soon).tasks == {1}
    nbf_later = jwt.encode(claims(nbf=now + 3600), SECRET, algorithm="HS256")
    assert refusal(lenient, nbf_later) == "not_yet_valid"
    iat_later = jwt.encode(claims(iat=now + 3600), SECRET, algorithm="HS256")
    assert refusal(lenient, iat_later) == "not_yet_valid"
    assert strict.verify(jwt.encode(claims(nbf=now - 1), SECRET, algorithm="HS256")).tasks == {1}


def test_exp_is_required() -> None:
    verifier = Verifier(secret=SECRET, leeway_s=0)
    payload = claims()
    del payload["exp"]
    assert refusal(verifier, jwt.encode(payload, SECRET, algorithm="HS256")) == "claims"
    assert refusal(verifier, jwt.encode(claims(exp=None), SECRET, algorithm="HS256")) == "claims"
    # an exp that is not a number is malformed
    assert refusal(verifier, jwt.encode(claims(exp="soon"), SECRET, algorithm="HS256")) == \
        "malformed"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = Verifier(secret=SECRET, audience="gw", issuer="https://issuer.test", leeway_s=0)

    def token(**extra: Any) -> str:
        return jwt.encode(claims(**extra), SECRET, algorithm="HS256")

    assert verifier.verify(token(aud="gw", iss="https://issuer.test")).tasks == {1}
    assert verifier.verify(token(aud=["other", "gw"], iss="https://issuer.test")).tasks == {1}
    assert refusal(verifier, token(aud="other", iss="https://issuer.test")) == "audience"
    assert refusal(verifier, token(aud=["a", "b"], iss="https://issuer.test")) == "audience"
    assert refusal(verifier, token(aud="gw", iss="https://evil.test")) == "issuer"
    # missing aud / iss when they are required: refused (PyJWT calls it a missing claim)
    assert refusal(verifier, token(iss="https://issuer.test")) == "claims"
    assert refusal(verifier, token(aud="gw")) == "claims"


def test_audience_and_issuer_are_ignored_when_not_configured() -> None:
    verifier = Verifier(secret=SECRET, leeway_s=0)
    token = jwt.encode(claims(aud="anything", iss="anyone"), SECRET, algorithm="HS256")
    assert verifier.verify(token).tasks == {1}
    assert verifier.audience is None and verifier.issuer is None
    # empty strings mean "not configured"
    assert Verifier(secret=SECRET, audience="", issuer="").verify(token).tasks == {1}


def sized_token(length: int) -> str:
    """A valid HS256 token of exactly `length` characters (padded with a claim and a kid)."""
    for kid in range(4):
        headers = {"kid": "k" * kid} if kid else None
        for pad in range(length):
            token = jwt.encode(claims(tasks=[1], pad="p" * pad), SECRET, algorithm="HS256",
                               headers=headers)
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError(f"no token of {length} characters")


def test_tokens_over_8192_bytes_are_refused_before_parsing() -> None:
    verifier = Verifier(secret=SECRET, leeway_s=0)
    assert MAX_TOKEN_BYTES == 8192
    assert verifier.verify(sized_token(8192)).tasks == {1}
    assert refusal(verifier, sized_token(8193)) == "too_large"
    assert refusal(verifier, "x" * 100_000) == "too_large"  # not even a JWT


# -- the tasks claim -----------------------------------------------------------------------------


@pytest.mark.parametrize(("tasks", "expected", "every"), [
    ([1, 2, 2], {1, 2}, False),
    (["42"], {42}, False),
    (["007", 7], {7}, False),
    ([str(2**53 + 1), 2**53 + 1, str(INT64_MAX)], {2**53 + 1, INT64_MAX}, False),
    ([0, INT64_MAX], {0, INT64_MAX}, False),
    ([], set(), False),
    ("*", set(), True),
])
def test_the_tasks_claim_becomes_the_grant(tasks: Any, expected: set[int], every: bool) -> None:
    token = jwt.encode(claims(tasks=tasks), SECRET, algorithm="HS256")
    grant = Verifier(secret=SECRET, leeway_s=0).verify(token)
    assert grant.tasks == expected
    assert grant.every_task is every


def test_no_tasks_claim_is_a_valid_token_that_opens_nothing() -> None:
    payload = claims()
    del payload["tasks"]
    grant = Verifier(secret=SECRET, leeway_s=0).verify(
        jwt.encode(payload, SECRET, algorithm="HS256"))
    assert not grant.every_task
    assert grant.tasks == frozenset()
    assert not grant.covers(0)
    assert grant.uncovered([3, 1, 3]) == [3, 1]
    grant = Verifier(secret=SECRET, leeway_s=0).verify(
        jwt.encode(claims(tasks=None), SECRET, algorithm="HS256"))
    assert grant.tasks == frozenset() and not grant.every_task


@pytest.mark.parametrize("tasks", [
    "7", "", "all", "**", 7, 1.0, True, {"a": 1}, [1.5], [2.0], [True], [None], [[1]], [{}],
    [-1], [INT64_MAX + 1], ["abc"], ["-1"], [" 7"], ["1_0"], ["٣"], [str(INT64_MAX + 1)],
    [1, "x"],
], ids=repr)
def test_a_malformed_tasks_claim_is_refused(tasks: Any) -> None:
    token = jwt.encode(claims(tasks=tasks), SECRET, algorithm="HS256")
    assert refusal(Verifier(secret=SECRET, leeway_s=0), token) == "claims"


def test_grant_uncovered_keeps_order_and_drops_repeats() -> None:
    grant = Grant(frozenset({1, 3}), False, exp=10, expires_at=10.0)
    assert grant.uncovered([5, 1, 4, 5, 3, 4]) == [5, 4]
    assert grant.uncovered([1, 3]) == []
    assert Grant(frozenset(), True, exp=10, expires_at=10.0).uncovered([5, 4]) == []


# -- access.py: where a request's token comes from ----------------------------------------------


def scope(headers: list[tuple[bytes, bytes]] | None = None, query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "headers": headers or [], "query_string": query}


@pytest.mark.parametrize(("headers", "query", "expected"), [
    ([], b"", None),
    ([(b"authorization", b"Bearer abc.def.ghi")], b"", "abc.def.ghi"),
    ([(b"authorization", b"bearer abc")], b"", "abc"),
    ([(b"authorization", b"BEARER   abc  ")], b"", "abc"),
    ([(b"authorization", b"Bearer hdr")], b"token=qry", "hdr"),  # the header wins
    ([(b"authorization", b"Bearer hdr")], b"token=a&token=b", "hdr"),
    ([(b"authorization", b"Basic dXNlcjpwdw==")], b"", None),  # not a bearer token
    ([(b"authorization", b"Basic dXNlcjpwdw==")], b"token=qry", "qry"),
    ([], b"token=qry", "qry"),
    ([], b"a=1&token=qry&b=2", "qry"),
    ([], b"token=a%2Eb%2Ec", "a.b.c"),
    ([], b"mytoken=x", None),
    ([], b"x=token=y", None),
    ([], b"token=", ""),  # an empty token is presented, and refused as malformed
    ([(b"accept", b"*/*")], b"image_base64=false", None),
], ids=lambda value: repr(value)[:40])
def test_token_of(headers: list[tuple[bytes, bytes]], query: bytes,
                  expected: str | None) -> None:
    assert token_of(scope(headers, query)) == expected


@pytest.mark.parametrize("query", [b"token=a&token=b", b"token=a&token=a", b"token=&token=b"])
def test_two_token_parameters_are_refused_as_malformed(query: bytes) -> None:
    with pytest.raises(TokenRefused) as caught:
        token_of(scope(query=query))
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("[::]", False),
    ("192.168.1.10", False), ("10.0.0.1", False), ("example.com", False), ("", False),
    ("localhost.example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_problem_refuses_an_open_gateway_on_a_network_address(tmp_path: Path) -> None:
    problem = exposure_problem(Settings(host="0.0.0.0", port=8123))
    assert problem is not None
    assert "0.0.0.0:8123" in problem
    assert "TASKCAST_JWT_SECRET" in problem
    assert "TASKCAST_AUTH=off" in problem
    assert exposure_problem(Settings(host="192.168.1.10")) is not None
    assert exposure_problem(Settings(host="example.com")) is not None
    assert exposure_problem(Settings(host="0.0.0.0", auth="off")) is None
    assert exposure_problem(Settings(host="0.0.0.0", jwt_secret=SECRET)) is None
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(P256_KEY))
    assert exposure_problem(Settings(host="0.0.0.0", jwt_public_key_file=str(pem))) is None
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_problem(Settings(host=host)) is None


def test_verifier_for(tmp_path: Path) -> None:
    assert verifier_for(Settings()) is None  # no key: open
    assert verifier_for(Settings(auth="off", jwt_secret=SECRET)) is None
    verifier = verifier_for(Settings(jwt_secret=SECRET, jwt_audience="a", jwt_issuer="i",
                                     jwt_leeway_s=3))
    assert verifier is not None
    assert (verifier.audience, verifier.issuer, verifier.leeway_s) == ("a", "i", 3)
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(ED25519_KEY))
    verifier = verifier_for(Settings(jwt_public_key_file=str(pem)))
    assert verifier is not None and verifier.algorithms == ("EdDSA",)
    with pytest.raises(KeyConfigError, match="TASKCAST_AUTH"):
        verifier_for(Settings(auth="maybe"))
    with pytest.raises(KeyConfigError):
        verifier_for(Settings(jwt_secret="short"))
    with pytest.raises(KeyConfigError):
        verifier_for(Settings(jwt_public_key_file=str(tmp_path / "missing.pem")))
    with pytest.raises(KeyConfigError):
        verifier_for(Settings(jwt_secret=SECRET, jwt_leeway_s=31))


def test_settings_defaults_follow_the_contract() -> None:
    defaults = Settings()
    assert defaults.auth == "on"
    assert defaults.ws_auth_timeout_s == 10  # "no valid token 10 s after it opened: 4401"
    assert 0 <= defaults.jwt_leeway_s <= 30
    assert "jwt_secret" not in repr(Settings(jwt_secret=SECRET))  # never printed
    assert SECRET not in repr(Settings(jwt_secret=SECRET))
    configured = Settings.from_env({
        "TASKCAST_JWT_SECRET": SECRET, "TASKCAST_JWT_AUDIENCE": "a", "TASKCAST_JWT_ISSUER": "i",
        "TASKCAST_JWT_LEEWAY_S": "2.5", "TASKCAST_WS_AUTH_TIMEOUT_S": "3", "TASKCAST_AUTH": "off",
        "TASKCAST_JWT_PUBLIC_KEY_FILE": "/k.pem"})
    assert (configured.jwt_secret, configured.jwt_audience, configured.jwt_issuer,
            configured.jwt_leeway_s, configured.ws_auth_timeout_s, configured.auth,
            configured.jwt_public_key_file) == (SECRET, "a", "i", 2.5, 3.0, "off", "/k.pem")


@pytest.mark.parametrize("missing", ["aud", "iss", "exp"])
def test_a_missing_required_claim_is_named_in_the_refusal(missing: str) -> None:
    # The description goes to the client (WWW-Authenticate error_description): it must name
    # the claim that is missing, not always `exp`.
    payload = claims(aud="gw", iss="svc")
    del payload[missing]
    verifier = Verifier(secret=SECRET, audience="gw", issuer="svc", leeway_s=0)
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(jwt.encode(payload, SECRET, algorithm="HS256"))
    assert caught.value.reason == "claims"
    assert missing in caught.value.description
