"""Security primitives for the service: encryption at rest, API keys with scopes, a hash-chained audit log.

Storage-agnostic: files and plain values in, files and plain values out. Each step is a plain call that
a reader of the service sees (encrypt on upload, verify a key per request, append an audit record).
"""

from tunesmith.security.apikeys import InvalidKeyError, NewKey, ParsedKey, Scope, new_key, parse_key
from tunesmith.security.apikeys import verify as verify_key
from tunesmith.security.audit import AuditError, AuditEvent, AuditFile, AuditRecord, VerifyResult, seal
from tunesmith.security.audit import verify as verify_chain
from tunesmith.security.encryption import (
    DecryptionError,
    Keyring,
    decrypt_bytes,
    decrypt_file,
    encrypt_bytes,
    encrypt_file,
    open_decrypted,
    rewrap,
)

__all__ = [
    "AuditError",
    "AuditEvent",
    "AuditFile",
    "AuditRecord",
    "DecryptionError",
    "InvalidKeyError",
    "Keyring",
    "NewKey",
    "ParsedKey",
    "Scope",
    "VerifyResult",
    "decrypt_bytes",
    "decrypt_file",
    "encrypt_bytes",
    "encrypt_file",
    "new_key",
    "open_decrypted",
    "parse_key",
    "rewrap",
    "seal",
    "verify_chain",
    "verify_key",
]
