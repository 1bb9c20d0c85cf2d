"""eBPF test gate: skip when this machine cannot run BPF, fail instead under SNI_PROXY_REQUIRE_EBPF=1.

CI and `make test` set SNI_PROXY_REQUIRE_EBPF=1 so a broken BPF setup can never pass as "all
skipped". Use in a test module:

    from tests.ebpf_required import require_ebpf
    pytestmark = pytest.mark.ebpf

    @pytest.fixture(autouse=True, scope="module")
    def _ebpf():
        require_ebpf()
"""
from __future__ import annotations

import functools
import os

import pytest

REQUIRE_ENV = "SNI_PROXY_REQUIRE_EBPF"


def ebpf_required_by_env() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


@functools.cache
def ebpf_unavailable_reason() -> str | None:
    """None when libbpf loads, the objects are built and a BPF map can really be created."""
    try:
        from sniproxy.ebpf import libbpf
    except Exception as e:  # noqa: BLE001 - any import failure is the reason
        return f"sniproxy.ebpf.libbpf does not import: {e}"
    if not libbpf.libbpf_available():
        return "libbpf.so.1 not found (apt-get install libbpf1)"
    from sniproxy.ebpf.objects import available_objects

    if not available_objects():
        return "BPF objects are not built: run `make bpf`"
    try:
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, "sni_proxy_test", 4, 4, 1)
    except libbpf.BpfError as e:
        return f"cannot create a BPF map: {e}"
    os.close(fd)
    return None


def skip_or_fail(reason: str) -> None:
    """pytest.skip(reason), or pytest.fail under SNI_PROXY_REQUIRE_EBPF=1."""
    if ebpf_required_by_env():
        pytest.fail(f"eBPF required ({REQUIRE_ENV}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"eBPF unavailable: {reason}")


def require_ebpf() -> None:
    """Call at the start of a test or fixture that needs real BPF."""
    reason = ebpf_unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)


@pytest.fixture
def ebpf() -> None:
    """Fixture form: `from tests.ebpf_required import ebpf` then request `ebpf`."""
    require_ebpf()
