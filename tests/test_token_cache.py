"""The verifier's cache of accepted tokens (tokens.Verifier.verify): a token that verified
once is answered from memory, but never past its expiry, and the cache stays bounded."""

from __future__ import annotations

import time

import jwt
import pytest

from taskcast.tokens import TokenRefused, Verifier, issue

SECRET = "cache-test-secret-" + "z" * 40


def test_a_cached_token_is_still_refused_once_it_expires() -> None:
    verifier = Verifier(secret=SECRET, leeway_s=0)
    token = issue(SECRET, [7], ttl_s=1)
    assert verifier.verify(token, remember=True).covers(7)
    assert verifier.verify(token, remember=True).covers(7)  # answered from the cache
    deadline = jwt.decode(token, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, deadline - time.time()) + 0.05)
    for _ in range(2):  # the hit that finds it expired, and the fresh verification after it
        with pytest.raises(TokenRefused) as refused:
            verifier.verify(token, remember=True)
        assert refused.value.reason == "expired"


def test_refused_tokens_are_not_cached_and_a_forged_twin_is_not_a_hit() -> None:
    verifier = Verifier(secret=SECRET)
    token = issue(SECRET, [7], ttl_s=60)
    verifier.verify(token, remember=True)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(TokenRefused) as refused:
            verifier.verify(forged)
        assert refused.value.reason in ("signature", "malformed")


def test_the_cache_is_bounded_and_evicted_tokens_verify_again() -> None:
    verifier = Verifier(secret=SECRET, cache_size=3)
    tokens = [issue(SECRET, [task_id], ttl_s=60) for task_id in range(10)]
    for task_id, token in enumerate(tokens):
        assert verifier.verify(token, remember=True).covers(task_id)
        assert len(verifier._verified) <= 3
    assert verifier.verify(tokens[0], remember=True).covers(0)  # evicted long ago: verified again


def test_only_tokens_verified_with_remember_are_kept() -> None:
    verifier = Verifier(secret=SECRET)
    for task_id in range(5):
        verifier.verify(issue(SECRET, [task_id], ttl_s=60))  # a stream's: verified once
    assert verifier._verified == {}
