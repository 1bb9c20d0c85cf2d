"""BpfError is an OSError you can branch on: errno names, not supported vs not permitted."""
from __future__ import annotations

import errno
import pickle

from sniproxy.ebpf.libbpf import ENOTSUPP, BpfError
from sniproxy.ebpf.support import Check


def test_bpf_error_is_an_oserror_with_its_errno_and_message():
    exc = BpfError("creating map sni_proxy_x", -errno.EPERM)
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EPERM and exc.strerror == "Operation not permitted"
    assert str(exc).startswith("creating map sni_proxy_x: Operation not permitted (errno 1)")
    assert "CAP_BPF" in str(exc)                   # the hint says which capability
    assert exc.not_permitted and not exc.not_supported


def test_not_supported_is_told_apart_from_not_permitted():
    for code in (errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS):
        exc = BpfError("loading a program", code)
        assert exc.not_supported and not exc.not_permitted


def test_bpf_error_survives_pickling_between_processes():
    exc = BpfError("attaching", errno.ENOENT, libbpf_message="no such program", hint="build it")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is BpfError and back.errno == errno.ENOENT and str(back) == str(exc)


def test_check_status_names_the_kind_of_refusal():
    assert Check("map:x", "x", "map", True).status == "ok"
    assert Check("map:x", "x", "map", False, errno=errno.EPERM).status == "not_permitted"
    assert Check("map:x", "x", "map", False, errno=errno.EINVAL).status == "not_supported"
    assert Check("map:x", "x", "map", False, errno=errno.EBUSY).status == "failed"


def test_a_missing_capability_is_not_permitted():
    assert Check("cap:CAP_BPF", "CAP_BPF", "privilege", False).status == "not_permitted"
