"""decide_modes: the one mapping from (requested, support, start failures) to feature modes."""
from sniproxy.ebpf.modes import decide_modes


class Support:
    def __init__(self, missing=()):
        self.missing = set(missing)

    def ok(self, feature):
        return feature not in self.missing

    def reason(self, feature):
        return f"{feature}: CAP_BPF missing; fix: grant it" if feature in self.missing else ""


ALL = {"sockmap": True, "dns_cache": True, "stats": True, "tcp_splice": True}


def test_everything_active_is_full():
    m = decide_modes(ALL, Support())
    assert m.status() == {"enabled": True, "mode": "full", "sockmap": "active",
                          "dns_cache": "active", "stats": "active", "tcp_splice": "active",
                          "reasons": {}}


def test_unsupported_feature_is_disabled_with_reason_and_mode_partial():
    m = decide_modes(ALL, Support(["sockmap"]))
    assert (m.mode, m.state("sockmap"), m.state("dns_cache")) == ("partial", "disabled", "active")
    assert "fix" in m.status()["reasons"]["sockmap"]
    assert [n for n, _ in m.unavailable()] == ["sockmap"]


def test_nothing_runs_is_none():
    assert decide_modes(ALL, Support(ALL)).mode == "none"
    assert decide_modes(ALL, Support(), ebpf_enabled=False).mode == "none"


def test_failure_at_start_and_degraded():
    m = decide_modes(ALL, Support(), failures={"dns_cache": "map create failed"},
                     degraded={"sockmap": "sndbuf not forced"})
    assert (m.state("sockmap"), m.state("dns_cache"), m.mode) == ("degraded", "disabled", "partial")
    assert m.features["sockmap"].running


def test_not_requested_is_disabled_but_not_missing():
    m = decide_modes({**ALL, "sockmap": False}, Support(["sockmap"]))
    assert m.state("sockmap") == "disabled" and "is false in the config" in m.features["sockmap"].reason
    assert m.mode == "full" and m.unavailable() == []


def test_one_list_of_data_path_features_and_every_table_keyed_by_it():
    """FEATURES (feature -> probes), FEATURE_CAPABILITIES, the config's switches and the
    modes all name the same data-path features: one meaning, one list (modes.DATA_PATH_FEATURES)."""
    from sniproxy.config import parse_config
    from sniproxy.ebpf.modes import DATA_PATH_FEATURES
    from sniproxy.ebpf.support import FEATURE_CAPABILITIES, FEATURES, requested_checks
    config = parse_config({"listen_addr": "127.0.0.1:8443", "default_backend": "127.0.0.1:9443",
                           "ebpf": {"enabled": True}})
    assert tuple(config.ebpf_requested()) == DATA_PATH_FEATURES
    assert set(FEATURE_CAPABILITIES) == set(DATA_PATH_FEATURES) <= set(FEATURES)
    keys, features = requested_checks({"enabled": True})
    assert features == list(DATA_PATH_FEATURES)
    assert {f"cap:{c}" for f in features for c in FEATURE_CAPABILITIES[f]} <= set(keys)
