"""Index namespaces and the tenants they count against (no faiss, no Ray: the ingress imports it).

A namespace is a tenant name, or a tenant's ``cache_salt`` namespace
``<tenant>.salt-<hash>``. Lookups only see their own namespace; quotas and eviction
fairness (:class:`semshare_core.index.SemanticIndex`) count every namespace of a tenant
against that tenant. Tenant names therefore never contain :data:`SALT_SEPARATOR`.
"""
from __future__ import annotations

SALT_SEPARATOR = ".salt-"


def quota_owner(namespace: str) -> str:
    """The tenant a namespace counts against: ``"acme.salt-<hash>"`` -> ``"acme"``; a plain tenant is its own."""
    return namespace.split(SALT_SEPARATOR, 1)[0]
