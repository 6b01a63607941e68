"""Tenant names and cache_salt namespaces: a salted namespace is recognisably its tenant's."""
from __future__ import annotations

import pytest

from semshare_core.namespaces import quota_owner
from serve_app.auth import KeyRing, AuthConfigError, open_mode_principal
from serve_app.ingress import salted_tenant
from serve_app.protocol import TENANT_RE as NAMESPACE_RE


@pytest.mark.parametrize("tenant", ["default", "a" * 64, "acme-corp.eu_1"])
def test_salted_namespace_keeps_the_whole_tenant(tenant):
    ns = salted_tenant(tenant, "some salt ✓")
    assert NAMESPACE_RE.match(ns) and quota_owner(ns) == tenant
    assert ns != salted_tenant(tenant, "another salt") and salted_tenant(tenant, None) == tenant


def test_tenant_names_cannot_name_a_salted_namespace():
    fake = salted_tenant("victim", "s")
    with pytest.raises(ValueError, match="salt"):
        open_mode_principal({"x-tenant": fake}, trust_tenant_header=True)
    with pytest.raises(AuthConfigError, match="salt"):
        KeyRing({"k" * 16: "x.salt-y"})
    assert open_mode_principal({"x-tenant": "victim"}, trust_tenant_header=True).tenant == "victim"
