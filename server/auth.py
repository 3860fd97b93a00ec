"""API keys -> tenants. Keys are configured as SHA-256 digests, never in clear.

`Authenticator.authenticate` guarantees: with no keys configured every request is the open
tenant ("anonymous", or the tenant of that name in the config) and the server logs that it is
open; with keys configured, a request without `Authorization: Bearer KEY` or with an unknown
key gets a 401 in OpenAI's envelope and never reaches the engine; a wrong key is never echoed
beyond a 4-character hint (its last 4 characters).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from server.config_file import TenantConfig
from server.errors import APIError

logger = logging.getLogger("conveyor.server")
OPEN_TENANT = "anonymous"


def hash_key(key: str) -> str:
    """The digest to put in `api_key_sha256`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hint(key: str) -> str:
    """What an error may show of a wrong key: its last 4 characters when it is long enough
    (12+) that they give nothing useful away, else nothing."""
    return f"****{key[-4:]}" if len(key) >= 12 and key[-4:].isprintable() else "****"


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", type="invalid_request_error")


@dataclass
class Authenticator:
    tenants: list[TenantConfig]
    _by_hash: dict[str, TenantConfig] = field(default_factory=dict)
    _open: TenantConfig | None = None

    def __post_init__(self) -> None:
        for t in self.tenants:
            for digest in t.api_key_sha256:
                digest = digest.lower()
                if digest in self._by_hash:
                    raise ValueError(f"tenants: the key digest {digest[:12]}... is given to both "
                                     f"{self._by_hash[digest].name!r} and {t.name!r}")
                self._by_hash[digest] = t
        if not self._by_hash:
            self._open = next((t for t in self.tenants if t.name == OPEN_TENANT),
                              TenantConfig(name=OPEN_TENANT))

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def log_mode(self) -> None:
        if self.is_open:
            logger.warning("no API keys configured: the server is OPEN, every request is served "
                           "as tenant %r", OPEN_TENANT)
        else:
            logger.info("API keys required: %d key(s) for %d tenant(s)", len(self._by_hash),
                        len({t.name for t in self._by_hash.values()}))

    def authenticate(self, authorization: str | None) -> TenantConfig:
        """The tenant for an `Authorization` header value; APIError(401) if not allowed."""
        if self._open is not None:
            return self._open
        if not authorization:
            raise _unauthorized("You didn't provide an API key. You need to provide your API key "
                                "in an Authorization header using Bearer auth "
                                "(i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized("The Authorization header must be `Bearer YOUR_KEY`.")
        tenant = self._by_hash.get(hash_key(key))
        if tenant is None:
            raise _unauthorized(f"Incorrect API key provided: {key_hint(key)}.")
        return tenant

    def require_admin(self, tenant: TenantConfig) -> None:
        """403 unless the tenant is an admin (an open server has no keys, so it is open too)."""
        if not (tenant.admin or self.is_open):
            raise APIError(403, "This route needs an admin API key.", code="admin_required",
                           type="invalid_request_error")
