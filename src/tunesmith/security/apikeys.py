"""API keys: `tsk_<key id>_<secret>`, stored as (key id, hash), checked in constant time, scoped.

The key id is public: the service looks a key up by it and may print it in logs and the audit trail.
Only the holder knows the secret; the store keeps a hash, so a leaked database grants no access.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from tunesmith.errors import UserError, did_you_mean

KEY_PREFIX = "tsk_"
KEY_ID_BYTES = 6  # 12 hex characters: enough to look keys up without collisions in practice
SECRET_BYTES = 32  # 256 bits of randomness -> 43 url-safe base64 characters
HASH_SCHEME = "sha256"  # stored as "sha256:<hex>" so a later scheme can sit beside it
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}(?P<key_id>[0-9a-f]{{{2 * KEY_ID_BYTES}}})_(?P<secret>[A-Za-z0-9_-]{{43}})")
_SHAPE = f"'{KEY_PREFIX}' + {2 * KEY_ID_BYTES} hex characters + '_' + 43 url-safe characters"


class InvalidKeyError(UserError):
    """The text is not shaped like an API key (a typo, a truncated copy, or some other token)."""


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: show `secret` to its owner once, store `key_id` and `hash`."""

    secret: str = field(repr=False)  # never in logs or tracebacks
    key_id: str
    hash: str


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str = field(repr=False)


class Scope(StrEnum):
    """What a key may do; each scope includes the ones below it: read < write < admin."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @classmethod
    def parse(cls, name: str) -> Scope:
        try:
            return cls(name)
        except ValueError:
            choices = [scope.value for scope in cls]
            raise UserError(
                f"scope '{name}' is not one of {', '.join(choices)}{did_you_mean(name, choices)}; "
                "fix: --scope read (or write, admin)"
            ) from None

    @property
    def rank(self) -> int:
        return list(Scope).index(self)

    def allows(self, required: Scope | str) -> bool:
        """True when a key with this scope may perform an action that needs `required`."""
        return self.rank >= Scope.parse(required).rank


def hash_key(text: str) -> str:
    """The stored form of a key.

    Plain SHA-256 is the right tool here, not bcrypt/scrypt/argon2: those slow down guessing of
    low-entropy passwords, but a key carries 256 random bits, so guessing is hopeless at any speed,
    and a slow hash would only add ~100 ms to every request. The whole key is hashed (with a label
    for domain separation), which also binds the hash to its key id.
    """
    return f"{HASH_SCHEME}:" + hashlib.sha256(b"tunesmith api key\x00" + text.encode()).hexdigest()


def new_key() -> NewKey:
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(secret=secret, key_id=key_id, hash=hash_key(secret))


def parse_key(text: str) -> ParsedKey:
    """Split a key into (key id, secret), or raise InvalidKeyError that says what shape was expected."""
    match = _KEY_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        length = len(text) if isinstance(text, str) else 0
        hint = "" if not isinstance(text, str) or text.startswith(KEY_PREFIX) else f", and it lacks '{KEY_PREFIX}'"
        # The message never repeats the text: a mistyped key is still mostly a secret.
        raise InvalidKeyError(
            f"malformed API key ({length} characters{hint}): expected {_SHAPE}; "
            "fix: copy the whole key printed by `tunesmith keys create`"
        )
    return ParsedKey(key_id=match["key_id"], secret=match["secret"])


def verify(secret: str, stored_hash: str) -> bool:
    """True only when `secret` is the key whose hash is `stored_hash`; False for malformed keys.

    The digests are compared with hmac.compare_digest so timing says nothing about how much matched.
    """
    scheme = stored_hash.partition(":")[0]
    if scheme != HASH_SCHEME:
        raise ValueError(f"stored key hash uses scheme '{scheme}', this build knows '{HASH_SCHEME}'")
    try:
        parse_key(secret)
    except InvalidKeyError:
        return False
    return hmac.compare_digest(hash_key(secret.strip()).encode(), stored_hash.encode())
