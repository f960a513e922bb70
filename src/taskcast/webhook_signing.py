"""Signing webhook messages per the Standard Webhooks specification (contract section 10).

A message is signed as `HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")`, sent as
`webhook-signature: v1,<base64>`; with several secrets (rotation) one signature per secret,
space-separated, so a receiver holding either the old or the new secret accepts it.
Secrets are `whsec_` followed by the base64 of 24 to 64 random bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64


class WebhookSigner:
    """Signs with every configured key; never shows a key in its repr or in an error."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one webhook secret is needed")
        self._keys = keys

    def __repr__(self) -> str:
        return f"WebhookSigner({len(self._keys)} secret(s))"

    @classmethod
    def from_setting(cls, value: str) -> WebhookSigner:
        """From TASKCAST_WEBHOOK_SECRET: `whsec_...`, comma-separated for rotation. A bad entry
        raises ValueError naming its position, not its content."""
        keys = []
        for position, entry in enumerate((part.strip() for part in value.split(",")), 1):
            if not entry:
                continue
            if not entry.startswith(SECRET_PREFIX):
                raise ValueError(f"TASKCAST_WEBHOOK_SECRET entry {position} does not start "
                                 f"with {SECRET_PREFIX}")
            try:
                key = base64.b64decode(entry[len(SECRET_PREFIX):], validate=True)
            except binascii.Error:
                raise ValueError(f"TASKCAST_WEBHOOK_SECRET entry {position} is not base64 "
                                 f"after {SECRET_PREFIX}") from None
            if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
                raise ValueError(f"TASKCAST_WEBHOOK_SECRET entry {position} decodes to "
                                 f"{len(key)} bytes; 24 to 64 are needed")
            keys.append(key)
        return cls(keys)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The `webhook-signature` header value."""
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in self._keys)

    def verify(self, msg_id: str, timestamp: str, body: bytes, signature_header: str) -> bool:
        """Whether any `v1,` signature in the header is one of ours for this message (in
        constant time). Receivers should also refuse timestamps far from their clock."""
        if not timestamp.isascii() or not timestamp.isdigit():
            return False
        expected = self.signature(msg_id, int(timestamp), body).split(" ")
        given = [part for part in signature_header.split(" ") if part.startswith("v1,")]
        return any(hmac.compare_digest(mine.encode(), theirs.encode())
                   for mine in expected for theirs in given)

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers of one attempt."""
        return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": self.signature(msg_id, timestamp, body)}
