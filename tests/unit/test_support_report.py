"""One support report per process: `check`, start-up and the profiler read the same one.

The report is measured once (about 50 ms of probes) and cached; start-up measures it in a
short-lived child and adopts the answer. These tests swap the cached report for a doctored
copy of the real one and see each consumer act on it, so none of them probes on its own."""
from __future__ import annotations

import dataclasses
import json

import pytest

from sniproxy.ebpf import support
from sniproxy.observe import profiler


@pytest.fixture
def cached():
    real = support.check_system_support()
    yield real
    support.adopt_report(real)


def test_the_report_is_measured_once_per_process(cached):
    assert support.check_system_support() is cached
    again = support.check_system_support(refresh=True)
    assert again is not cached and support.check_system_support() is again


def test_the_profiler_reads_the_cached_report(cached):
    support.adopt_report(dataclasses.replace(cached, kernel="4.19.0-old", kernel_version=(4, 19)))
    with pytest.raises(profiler.KernelTooOld, match="kernel 4.19.0-old is too old"):
        profiler.check_profiler_support()
    support.adopt_report(dataclasses.replace(cached, btf=False))
    with pytest.raises(profiler.BtfMissing, match="CONFIG_DEBUG_INFO_BTF"):
        profiler.check_profiler_support()


def test_check_prints_the_cached_report(cached, capsys):
    from sniproxy.check_cli import cli_check
    support.adopt_report(dataclasses.replace(cached, kernel="9.9.9-adopted"))
    cli_check(["--json"])
    assert json.loads(capsys.readouterr().out)["kernel"] == "9.9.9-adopted"


def test_start_up_adopts_the_report_its_child_measured(cached, monkeypatch):
    from sniproxy.proxy.main import probe_support_in_child
    monkeypatch.setattr(support, "_cached_report", None)    # as in a fresh supervisor
    report = probe_support_in_child()            # measured in a child, pickled back
    assert report is not cached and report.kernel == cached.kernel
    assert support.check_system_support() is report         # the profiler will read this one
