"""Each Twilio account's tokens and signing keys: what a signed request is checked with, and the
credentials the REST API takes.

Two settings say which, never both (``settings.check``):

- ``TWILIO_AUTH_TOKEN``: one account, whatever its AccountSid; its auth tokens separated by
  commas, the primary first. Several at once is how a token is rotated without a refused
  message (docs/operating.md).
- ``TWILIO_ACCOUNTS``: every account the service answers for, by AccountSid (subaccounts, an
  account in several regions), as a JSON object, inline or in a file::

      {"AC…": {"auth_tokens": ["primary", "secondary"],
               "shared_keys": {"webhooks_sharedkey_1": "its secret"}}}

  A request whose AccountSid is not listed is refused.

A request carrying ``X-Twilio-Webhooks-Signature-Settings`` is signed with a SharedKey secret,
chosen by the header's key id among its account's ``shared_keys``, not with an auth token.

The API other modules use: the app's ``Accounts`` is its wiring's ``accounts``; ``Accounts.account(sid)``
the ``Account`` that answers an AccountSid (its ``tokens``, ``shared_keys``, ``auth_token``);
``Accounts.auth_token(sid)`` the auth token the REST API takes for that account.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# An account has a primary and a secondary auth token; a region move adds another region's
# pair. Each one is tried in turn on a message no earlier one validates.
MAX_TOKENS = 4
TOKEN_LABELS = ("primary", "secondary", "third", "fourth")
DIGESTS = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}


class Secret:
    """One secret, named by a label that metrics and logs may show (``primary``, a key id);
    the secret itself shows nowhere (not in ``repr``)."""

    __slots__ = ("_keyed", "label", "value")

    def __init__(self, label: str, value: str):
        self.label = label
        self.value = value
        # Keyed once per algorithm, copied per message: a copy skips hashing the padded key
        # into HMAC's inner and outer digests, which a short message would otherwise repeat.
        self._keyed: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Secret({self.label!r})"

    def signs(self, data: bytes, signature: bytes, algorithm: str) -> bool:
        """True when ``signature`` is the base64 HMAC of ``data`` under this secret, compared
        in constant time. ``algorithm``: a key of ``DIGESTS``."""
        keyed = self._keyed.get(algorithm)
        if keyed is None:
            keyed = hmac.new(self.value.encode("utf-8"), digestmod=DIGESTS[algorithm])
            self._keyed[algorithm] = keyed
        mac = keyed.copy()
        mac.update(data)
        return hmac.compare_digest(base64.b64encode(mac.digest()), signature)


@dataclass(frozen=True)
class Account:
    """One Twilio account: its auth tokens, primary first, and its SharedKey secrets by key id.
    ``sid`` is None for the one account ``TWILIO_AUTH_TOKEN`` configures."""

    sid: str | None
    tokens: tuple[Secret, ...]
    shared_keys: Mapping[str, Secret]

    @property
    def auth_token(self) -> str | None:
        """The primary auth token, the one the REST API takes; None for an account that
        only signs with SharedKeys."""
        return self.tokens[0].value if self.tokens else None


class Accounts:
    """The accounts the service answers for: one for every AccountSid (``TWILIO_AUTH_TOKEN``),
    or one per listed AccountSid (``TWILIO_ACCOUNTS``), or none (every signed request refused)."""

    def __init__(self, listed: Mapping[str, Account] | None, single: Account | None):
        self.listed = listed
        self.single = single

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Accounts:
        listed = config.get("TWILIO_ACCOUNTS")
        if isinstance(listed, str):  # a test's config, not parsed by settings.load
            listed = parse_accounts(listed)
        token = config.get("TWILIO_AUTH_TOKEN")
        single = Account(None, _tokens(tokens(token)), MappingProxyType({})) if token else None
        return cls(listed or None, single)

    def account(self, account_sid: str | None) -> Account | None:
        """The account that answers ``account_sid``, None when none does."""
        if self.listed is None:
            return self.single
        return self.listed.get(account_sid or "")

    def auth_token(self, account_sid: str) -> str | None:
        """The auth token the REST API takes for ``account_sid`` (its primary), or None."""
        account = self.account(account_sid)
        return account.auth_token if account is not None else None

    def __iter__(self):
        if self.listed is not None:
            return iter(self.listed.values())
        return iter([self.single] if self.single is not None else [])

    def labels(self) -> set[str]:
        """Every label a secret of these accounts goes by (a metric's label values)."""
        return {secret.label for account in self for secret in _secrets(account)}


def _secrets(account: Account) -> Iterable[Secret]:
    yield from account.tokens
    yield from account.shared_keys.values()


def _tokens(values: Iterable[str]) -> tuple[Secret, ...]:
    return tuple(Secret(label, value) for label, value in zip(TOKEN_LABELS, values, strict=False))


def tokens(value: str) -> tuple[str, ...]:
    """``TWILIO_AUTH_TOKEN``'s tokens, primary first: one, or several separated by commas.
    Raises ValueError (naming no token) unless there are 1 to ``MAX_TOKENS``, none empty or
    repeated."""
    found = tuple(token.strip() for token in value.split(","))
    _check_tokens(found, "")
    return found


def _check_tokens(found: tuple[str, ...], where: str) -> None:
    if not 1 <= len(found) <= MAX_TOKENS:
        raise ValueError(f"{where}expected 1 to {MAX_TOKENS} auth tokens, primary first")
    if not all(found):
        raise ValueError(f"{where}an auth token is empty")
    if len(set(found)) != len(found):
        raise ValueError(f"{where}an auth token is listed twice")


def parse_token_setting(value: str) -> str:
    """``TWILIO_AUTH_TOKEN`` checked (``tokens``), kept as it is."""
    tokens(value)
    return value


def parse_accounts(value: str) -> Mapping[str, Account]:
    """``TWILIO_ACCOUNTS``: a JSON object (when it starts with ``{``) or the path of a file
    holding one. Raises ValueError naming what is wrong, and where, but never a secret."""
    text = value.strip()
    where = ""
    if not text.startswith("{"):
        where = f"{text}: "
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8"
            raise ValueError(f"{where}cannot be read: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # Its message names the line and column, not the text there.
        at = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{where}not JSON: {error.msg} ({at})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}expected a JSON object of accounts by AccountSid")
    accounts = {}
    for number, (sid, entry) in enumerate(data.items(), start=1):
        if not ACCOUNT_SID.fullmatch(sid):
            raise ValueError(f"{where}entry {number}: its name is not an AccountSid (AC and 32 hex digits)")
        accounts[sid] = _account(sid, entry, f"{where}{sid}: ")
    return MappingProxyType(accounts)


def _account(sid: str, entry: Any, where: str) -> Account:
    if not isinstance(entry, dict) or not set(entry) <= {"auth_tokens", "shared_keys"}:
        raise ValueError(f'{where}expected {{"auth_tokens": [...], "shared_keys": {{...}}}}')
    found = entry.get("auth_tokens", [])
    shared = entry.get("shared_keys", {})
    if not isinstance(found, list) or not all(isinstance(token, str) for token in found):
        raise ValueError(f"{where}auth_tokens must be a list of strings")
    if not isinstance(shared, dict) or not all(isinstance(value, str) and value for value in shared.values()):
        raise ValueError(f"{where}shared_keys must map key ids to non-empty strings")
    if found or not shared:
        _check_tokens(tuple(found), where)
    for key_id in shared:
        if not KEY_ID.fullmatch(key_id):
            raise ValueError(f"{where}a shared key id is not 1 to 64 letters, digits, '_', '.' or '-'")
    keys = {key_id: Secret(key_id, secret) for key_id, secret in shared.items()}
    return Account(sid, _tokens(found), MappingProxyType(keys))
