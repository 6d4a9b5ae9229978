"""Identifiers people read or type, and ones nobody may guess."""

from __future__ import annotations

import secrets

# Crockford's base32: no I, L, O, U, so ids survive being read aloud or retyped.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _random_base32(length: int) -> str:
    # One draw of 5 bits per character (a character per call of secrets.choice cost a system call each).
    bits = secrets.randbits(5 * length)
    return "".join(_ALPHABET[(bits >> (5 * position)) & 31] for position in range(length))


def new_run_id() -> str:
    """`R` + 9 base32 characters (45 random bits): short enough for `/relay status R4K2...`."""
    return "R" + _random_base32(9)


def new_connection_id() -> str:
    """The unguessable part of a connection URL (160 random bits)."""
    return "c_" + secrets.token_urlsafe(20)


def new_webhook_secret() -> str:
    """A Standard-Webhooks style secret: `whsec_` + base64 of 32 random bytes."""
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def normalize_run_id(text: str) -> str:
    """What a user typed → the run id it names (case, Crockford look-alikes and the backticks or asterisks of
    a copied `R…` forgiven)."""
    cleaned = text.strip().strip("`*_").upper().replace("O", "0").replace("I", "1").replace("L", "1")
    return cleaned
