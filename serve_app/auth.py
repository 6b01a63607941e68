"""API keys -> tenants, and who may act on whom.

Two modes, decided by the configuration:

* **keyed** (at least one key configured, inline ``api_keys`` / ``admin_keys``, the
  env var named by ``api_keys_env`` (default ``SEMSHARE_API_KEYS``) or the file
  ``api_keys_file``): every route but health needs ``Authorization: Bearer <key>``;
  the tenant is the one the key maps to; tenant headers are ignored. Keys are kept
  only as SHA-256 digests and compared with :func:`hmac.compare_digest` against every
  configured digest (no early exit), so the comparison time does not depend on how
  much of a key matches.
* **open** (no key anywhere): no authentication. The tenant is ``X-Tenant`` (or the
  older ``X-SemShare-Tenant``) when ``trust_tenant_header``; else a tenant derived
  from a hash of a Bearer token if one is sent; else ``default``. Anyone can claim any
  tenant: isolation is cooperative, for a trusted network or behind a proxy that sets
  the header. There is no admin in open mode.

Key sources accept JSON (``{"key": "tenant", ...}``) or ``key=tenant`` pairs
separated by commas or new lines (``#`` starts a comment in a file).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

# tenant names: never containing ".salt-" (that marks a tenant's cache_salt namespace,
# semshare_core.namespaces): a tenant could otherwise name another's salted namespace
TENANT_RE = re.compile(r"^(?!.*\.salt-)[A-Za-z0-9_.\-]{1,64}$")
TENANT_RULE = "[A-Za-z0-9_.-]{1,64} without '.salt-'"
KEY_RE = re.compile(r"^[\x21-\x7e]{8,512}$")  # printable ASCII, no spaces, 8..512 chars
ADMIN_TENANT = "admin"
TENANT_HEADERS = ("x-tenant", "x-semshare-tenant")


class AuthConfigError(ValueError):
    """The key configuration is unusable (bad syntax, bad tenant name, short key)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: their tenant, whether they may act on all tenants, and how we know."""

    tenant: str
    admin: bool = False
    authenticated: bool = False


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``{"key": "tenant"}`` JSON, or ``key=tenant`` pairs (comma or newline separated)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AuthConfigError(f"{source}: invalid JSON ({e.msg})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise AuthConfigError(f"{source}: expected a JSON object of key -> tenant strings")
        return dict(data)
    out: dict[str, str] = {}
    for raw in re.split(r"[,\n]", text):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        if "=" not in item:
            raise AuthConfigError(f"{source}: expected key=tenant, got an item without '='")
        key, tenant = (s.strip() for s in item.rsplit("=", 1))
        out[key] = tenant
    return out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """Digests of the configured keys and what each one grants."""

    def __init__(self, keys: Mapping[str, str], admin_keys: Mapping[str, str] | None = None,
                 admin_tenants: tuple[str, ...] | list[str] = ()):
        self._entries: list[tuple[bytes, Principal]] = []
        admin_tenants = set(admin_tenants)
        for t in admin_tenants:
            if not TENANT_RE.match(t):
                raise AuthConfigError(f"admin tenant {t!r} must match {TENANT_RULE}")
        merged: dict[str, tuple[str, bool]] = {}
        for key, tenant in keys.items():
            merged[key] = (tenant, tenant in admin_tenants)
        for key, tenant in (admin_keys or {}).items():
            merged[key] = (tenant, True)
        for key, (tenant, admin) in merged.items():
            if not isinstance(key, str) or not KEY_RE.match(key):
                raise AuthConfigError("API keys must be 8-512 printable ASCII characters without spaces "
                                      f"(a key for tenant {tenant!r} is not)")
            if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
                raise AuthConfigError(f"tenant {tenant!r} must match {TENANT_RULE}")
            self._entries.append((_digest(key), Principal(tenant, admin, True)))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: Optional[str]) -> Optional[Principal]:
        """The principal of ``Authorization: Bearer <key>``, or None (missing / unknown key)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 4096:
            return None
        d = _digest(token)
        found = None
        for digest, principal in self._entries:  # always walk them all
            if hmac.compare_digest(digest, d) and found is None:
                found = principal
        return found

    @classmethod
    def from_args(cls, args, environ: Mapping[str, str] | None = None) -> "KeyRing":
        """Inline ``api_keys`` + env var + file (later sources override a key's tenant)."""
        environ = os.environ if environ is None else environ
        keys: dict[str, str] = dict(args.api_keys or {})
        if args.api_keys_env and environ.get(args.api_keys_env):
            keys.update(parse_keys(environ[args.api_keys_env], f"${args.api_keys_env}"))
        if args.api_keys_file:
            path = Path(args.api_keys_file).expanduser()
            try:
                text = path.read_text()
            except OSError as e:
                raise AuthConfigError(f"api_keys_file {str(path)!r} cannot be read: {e.strerror}") from None
            keys.update(parse_keys(text, str(path)))
        admin = {k: ADMIN_TENANT for k in (args.admin_keys or [])}
        if args.admin_keys_env and environ.get(args.admin_keys_env):
            admin.update({k.strip(): ADMIN_TENANT for k in re.split(r"[,\n]", environ[args.admin_keys_env])
                          if k.strip()})
        return cls(keys, admin, tuple(args.admin_tenants or ()))


def open_mode_principal(headers: Mapping[str, str], trust_tenant_header: bool) -> Principal:
    """Tenant without keys: header, else hash of a Bearer token, else ``default``.

    Raises ``ValueError`` for a tenant header that is not a valid tenant name.
    """
    if trust_tenant_header:
        for name in TENANT_HEADERS:
            value = headers.get(name)
            if value is not None:
                if not TENANT_RE.match(value):
                    raise ValueError(f"{'X-Tenant' if name == 'x-tenant' else 'X-SemShare-Tenant'} must match "
                                     + TENANT_RULE)
                return Principal(value)
    auth = headers.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return Principal("k-" + hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).hexdigest()[:24])
    return Principal("default")
