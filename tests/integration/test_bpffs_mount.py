"""The bpffs auto-mount is explicit start-up code and says so in the log.

Each case runs in a private mount namespace (`unshare --mount`) with /sys/fs/bpf unmounted
there, so the host's mounts (and other processes' pins) are never touched."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.ebpf_required import require_ebpf, skip_or_fail

pytestmark = pytest.mark.ebpf

CHILD = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from sniproxy.config import parse_config
    from sniproxy.ebpf import bpffs
    from sniproxy.relay.datapath import _open_dns_cache
    assert not bpffs.is_bpffs("/sys/fs/bpf"), "the namespace still has a bpffs"
    config = parse_config({
        "listen_addr": "127.0.0.1:8443", "default_backend": "127.0.0.1:9443",
        "ebpf": {"enabled": True, "dns_cache": {"pin_path": "/sys/fs/bpf/sni-proxy-t"}}})
    failures = {}
    dns = _open_dns_cache(config, failures)
    print(json.dumps({"bpffs": bpffs.is_bpffs("/sys/fs/bpf"), "failures": failures,
                      "shared": dns is not None, "note": dns.note if dns else None,
                      "pinned": __import__("os").path.exists("/sys/fs/bpf/sni-proxy-t/dns_cache")}))
""")


def _in_private_mounts(*prefix: str) -> subprocess.CompletedProcess:
    require_ebpf()
    if shutil.which("unshare") is None:
        skip_or_fail("unshare (util-linux) is not installed")
    script = ("mountpoint -q /sys/fs/bpf && umount /sys/fs/bpf; "
              f"exec {' '.join(prefix)} {sys.executable} -c \"$CHILD\"")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       env={"CHILD": CHILD, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                            "PYTHONPATH": ":".join(sys.path)},
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "unshare failed" in r.stderr:
        skip_or_fail(f"cannot make a mount namespace: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    return r


def test_start_up_mounts_bpffs_for_a_pinned_dns_cache_and_logs_it():
    r = _in_private_mounts()
    result = json.loads(r.stdout)
    assert result["note"] == "pinned at /sys/fs/bpf/sni-proxy-t/dns_cache"
    assert (result["bpffs"], result["failures"], result["shared"], result["pinned"]) == (
        True, {}, True, True)
    assert ("INFO mounted bpffs at /sys/fs/bpf for the shared DNS cache "
            "(ebpf.dns_cache.pin_path)") in r.stderr


def test_without_root_it_is_not_mounted_and_the_reason_says_how_to():
    """CAP_BPF but not root: the map is shared by fd only, and the note (logged at start-up as
    "eBPF DNS cache: ...", shown in /status) says how to mount."""
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is not installed")
    r = _in_private_mounts("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=+bpf", "--ambient-caps=+bpf")
    result = json.loads(r.stdout)
    assert (result["bpffs"], result["shared"], result["pinned"]) == (False, True, False)
    assert result["note"] == ("bpffs is not mounted at /sys/fs/bpf and only root can mount it "
                              "(`sudo mount -t bpf bpf /sys/fs/bpf`)")
    assert "mounted bpffs" not in r.stderr
