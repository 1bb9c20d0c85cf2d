"""EbpfConfig: immutable builders, validation messages, recommended configs."""
from __future__ import annotations

import dataclasses
import os

import pytest

from sniproxy.observe.config import (
    MAX_TARGET_PIDS,
    AllProcesses,
    Cgroup,
    ConfigValidationError,
    CurrentProcess,
    EbpfConfig,
    Pids,
    cgroup2_mounts,
    create_recommended_config,
    recommended_sample_rate,
)


def test_builders_return_new_configs_and_leave_the_original_alone():
    base = EbpfConfig()
    changed = (
        base.with_sample_rate(49)
        .with_network_tracing(False)
        .with_syscall_tracing(False)
        .with_memory_tracing(True)
        .with_max_samples(123)
        .with_pids(10, 20)
    )
    assert base == EbpfConfig()
    assert changed.sample_rate_hz == 49
    assert (changed.enable_network_tracing, changed.enable_syscall_tracing) == (False, False)
    assert changed.enable_memory_tracing is True
    assert changed.max_samples == 123
    assert changed.target == Pids((10, 20))
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.sample_rate_hz = 1  # type: ignore[misc]


def test_target_builders():
    c = EbpfConfig()
    assert isinstance(c.target, AllProcesses)
    assert isinstance(c.with_current_process().target, CurrentProcess)
    assert c.with_cgroup("/sys/fs/cgroup/x").target == Cgroup("/sys/fs/cgroup/x")
    assert isinstance(c.with_pids(1).with_all_processes().target, AllProcesses)


def test_default_config_is_valid():
    EbpfConfig().validate(kernel_max_sample_rate=100_000)


@pytest.mark.parametrize("rate", [0, -5])
def test_rate_must_be_positive(rate):
    with pytest.raises(ConfigValidationError) as err:
        EbpfConfig().with_sample_rate(rate).validate(kernel_max_sample_rate=100_000)
    assert "sample_rate_hz" in str(err.value) and "at least 1 Hz" in str(err.value)


def test_rate_above_kernel_ceiling_names_the_sysctl():
    with pytest.raises(ConfigValidationError) as err:
        EbpfConfig().with_sample_rate(500).validate(kernel_max_sample_rate=250)
    msg = str(err.value)
    assert "perf_event_max_sample_rate" in msg and "250" in msg


def test_rate_ceiling_is_read_from_the_running_kernel():
    with open("/proc/sys/kernel/perf_event_max_sample_rate") as f:
        ceiling = int(f.read())
    with pytest.raises(ConfigValidationError):
        EbpfConfig().with_sample_rate(ceiling + 1).validate()


def test_rate_not_an_int_and_bools_not_ints():
    with pytest.raises(ConfigValidationError, match="integer"):
        EbpfConfig().with_sample_rate(99.5).validate(kernel_max_sample_rate=1000)  # type: ignore[arg-type]
    with pytest.raises(ConfigValidationError, match="integer"):
        EbpfConfig().with_sample_rate(True).validate(kernel_max_sample_rate=1000)  # type: ignore[arg-type]


def test_absurd_rate_refused_even_when_kernel_allows_it():
    with pytest.raises(ConfigValidationError, match="199 Hz"):
        EbpfConfig().with_sample_rate(5000).validate(kernel_max_sample_rate=100_000)


def test_max_samples_zero_and_huge():
    with pytest.raises(ConfigValidationError, match="max_samples: got 0"):
        EbpfConfig().with_max_samples(0).validate(kernel_max_sample_rate=1000)
    with pytest.raises(ConfigValidationError, match="at most"):
        EbpfConfig().with_max_samples(10**9).validate(kernel_max_sample_rate=1000)


def test_every_problem_is_reported_one_per_line():
    bad = EbpfConfig().with_sample_rate(0).with_max_samples(0).with_network_tracing("yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigValidationError) as err:
        bad.validate(kernel_max_sample_rate=1000)
    assert len(err.value.problems) == 3
    assert str(err.value).count("\n") == 2


def test_pid_targets():
    ok = EbpfConfig().with_pids(1, 2)
    ok.validate(kernel_max_sample_rate=1000)
    with pytest.raises(ConfigValidationError, match="empty pid list"):
        EbpfConfig().with_pids().validate(kernel_max_sample_rate=1000)
    with pytest.raises(ConfigValidationError, match="positive"):
        EbpfConfig().with_pids(0).validate(kernel_max_sample_rate=1000)
    many = EbpfConfig().with_pids(*range(1, MAX_TARGET_PIDS + 2))
    with pytest.raises(ConfigValidationError, match=f"at most {MAX_TARGET_PIDS}"):
        many.validate(kernel_max_sample_rate=1000)


def test_cgroup_target_outside_cgroup2_is_refused(tmp_path):
    with pytest.raises(ConfigValidationError, match="cgroup v2"):
        EbpfConfig().with_cgroup(tmp_path).validate(kernel_max_sample_rate=1000)
    # Pure validation can skip the filesystem.
    EbpfConfig().with_cgroup(tmp_path).validate(kernel_max_sample_rate=1000, check_paths=False)


def test_cgroup2_root_is_accepted():
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.skip("no cgroup2 hierarchy mounted")
    EbpfConfig().with_cgroup(mounts[0]).validate(kernel_max_sample_rate=1000)
    with pytest.raises(ConfigValidationError, match="No such file"):
        missing = os.path.join(mounts[0], "sni-proxy-does-not-exist")
        EbpfConfig().with_cgroup(missing).validate(kernel_max_sample_rate=1000)


@pytest.mark.parametrize(
    "env,hz", [("production", 19), ("staging", 49), ("development", 99), ("debug", 199)]
)
def test_recommended_rates(env, hz):
    assert recommended_sample_rate(env) == hz
    config = create_recommended_config(env)
    assert config.sample_rate_hz == hz
    assert config.enable_cpu_profiling
    config.validate(kernel_max_sample_rate=100_000)


def test_production_profiles_cpu_only_and_development_enables_everything():
    prod = create_recommended_config("production")
    assert not (prod.enable_network_tracing or prod.enable_syscall_tracing or prod.enable_memory_tracing)
    dev = create_recommended_config("development")
    assert dev.enable_network_tracing and dev.enable_syscall_tracing and dev.enable_memory_tracing


def test_unknown_environment_lists_the_valid_names():
    with pytest.raises(ConfigValidationError) as err:
        create_recommended_config("prod")
    for name in ("production", "staging", "development", "debug"):
        assert name in str(err.value)
    with pytest.raises(ConfigValidationError):
        recommended_sample_rate("")
