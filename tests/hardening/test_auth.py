"""API keys and tenants (serve_app.auth, serve_app.settings) without Ray."""
from __future__ import annotations

import pytest

from serve_app.auth import AuthConfigError, KeyRing, Principal, open_mode_principal, parse_keys
from serve_app.settings import AppArgs

BASE = {"model": "tiny-random", "api_keys_env": None, "admin_keys_env": None}


def ring(**kw) -> KeyRing:
    return KeyRing.from_args(AppArgs(**{**BASE, **kw}), environ=kw.pop("environ", {}))


def test_parse_both_formats():
    assert parse_keys('{"sk-aaaaaaaa": "t1"}', "x") == {"sk-aaaaaaaa": "t1"}
    assert parse_keys("sk-aaaaaaaa=t1, sk-bbbbbbbb=t2\n# c\nsk-cccccccc = t3 # comment", "x") == {
        "sk-aaaaaaaa": "t1", "sk-bbbbbbbb": "t2", "sk-cccccccc": "t3"}
    for bad in ("{not json", '["a"]', "novalue", '{"k": 1}'):
        with pytest.raises(AuthConfigError):
            parse_keys(bad, "x")


def test_no_keys_is_open_mode():
    assert not ring().enabled
    assert open_mode_principal({}, True) == Principal("default")
    assert open_mode_principal({"x-tenant": "acme"}, True) == Principal("acme")
    assert open_mode_principal({"x-semshare-tenant": "acme"}, True) == Principal("acme")
    assert open_mode_principal({"x-tenant": "acme"}, False) == Principal("default")
    assert open_mode_principal({"authorization": "Bearer abc"}, True).tenant.startswith("k-")
    with pytest.raises(ValueError):
        open_mode_principal({"x-tenant": "a b"}, True)


def test_inline_env_file_and_admin(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-file-00000001=filet\n")
    r = KeyRing.from_args(AppArgs(**{**BASE, "api_keys": {"sk-inline-0001": "inl"}, "api_keys_env": "K",
                                     "api_keys_file": str(f), "admin_keys": ["sk-admin-00001"],
                                     "admin_keys_env": "A", "admin_tenants": ["boss"]}),
                          environ={"K": '{"sk-env-0000001": "envt", "sk-boss-000001": "boss"}',
                                   "A": "sk-admin-00002"})
    assert r.enabled and len(r) == 6
    assert r.authenticate("Bearer sk-inline-0001") == Principal("inl", False, True)
    assert r.authenticate("bearer sk-env-0000001") == Principal("envt", False, True)
    assert r.authenticate("Bearer sk-file-00000001").tenant == "filet"
    assert r.authenticate("Bearer sk-boss-000001") == Principal("boss", True, True)
    assert r.authenticate("Bearer sk-admin-00001").admin and r.authenticate("Bearer sk-admin-00002").admin
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-inline-0001", "Bearer sk-inline-000", "sk-inline-0001",
                "Bearer sk-inline-00011", "Bearer " + "x" * 5000):
        assert r.authenticate(bad) is None


def test_bad_configuration_fails_loudly(tmp_path):
    with pytest.raises(AuthConfigError):
        ring(api_keys={"short": "t"})
    with pytest.raises(AuthConfigError):
        ring(api_keys={"sk-long-enough": "bad tenant"})
    with pytest.raises(AuthConfigError):
        ring(api_keys_file=str(tmp_path / "missing"))
    with pytest.raises(AuthConfigError):
        ring(admin_tenants=["no spaces allowed"])
