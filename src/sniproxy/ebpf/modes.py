"""Capability decides, config asks: the ONE place that maps both to the mode of each feature.

    modes = decide_modes(config.ebpf_requested(), check_system_support(),
                         failures={"dns_cache": "pinning map: ..."}, degraded={...})
    modes.mode        # "full" | "partial" | "none"
    modes.status()    # the /status `ebpf` object (seed shape)

A feature is
* ``disabled`` when the config does not ask for it, the support report says it cannot run
  here, or starting it failed (`failures`): traffic then takes the user-space path;
* ``degraded`` when it runs with a limitation (`degraded`, e.g. the send buffer cannot be
  forced without CAP_NET_ADMIN);
* ``active`` otherwise.

The overall mode is ``full`` when every requested feature is active, ``none`` when none runs
(active or degraded), else ``partial``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# The proxy's kernel data path features, each with its own mode (support.FEATURES maps each
# to the probes it needs).
DATA_PATH_FEATURES = ("sockmap", "dns_cache", "stats", "tcp_splice")

ACTIVE, DEGRADED, DISABLED = "active", "degraded", "disabled"


class SupportLike(Protocol):
    def ok(self, feature: str) -> bool: ...

    def reason(self, feature: str) -> str: ...


@dataclass(frozen=True)
class FeatureMode:
    state: str                  # active / degraded / disabled
    reason: str = ""            # why not active (with the fix), "" when active
    requested: bool = True

    @property
    def running(self) -> bool:
        return self.state in (ACTIVE, DEGRADED)


@dataclass(frozen=True)
class Modes:
    enabled: bool
    features: dict[str, FeatureMode] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        wanted = [f for f in self.features.values() if f.requested]
        if not self.enabled or not any(f.running for f in wanted):
            return "none"
        return "full" if all(f.state == ACTIVE for f in wanted) else "partial"

    def state(self, feature: str) -> str:
        return self.features[feature].state

    def running(self, feature: str) -> bool:
        return self.features[feature].running

    def unavailable(self) -> list[tuple[str, FeatureMode]]:
        """Requested features that are not active (each gets one WARN, or stops strict mode)."""
        return [(n, f) for n, f in self.features.items() if f.requested and f.state != ACTIVE]

    def status(self) -> dict:
        out: dict = {"enabled": self.enabled, "mode": self.mode}
        out.update({name: f.state for name, f in self.features.items()})
        out["reasons"] = {name: f.reason for name, f in self.features.items() if f.reason}
        return out


def decide_modes(requested: dict[str, bool], support: SupportLike | None, *,
                 ebpf_enabled: bool = True, failures: dict[str, str] | None = None,
                 degraded: dict[str, str] | None = None) -> Modes:
    """The mode of every feature from what is asked, what this system allows and what happened."""
    failures = failures or {}
    degraded = degraded or {}
    features: dict[str, FeatureMode] = {}
    for name in DATA_PATH_FEATURES:
        if not ebpf_enabled:
            features[name] = FeatureMode(DISABLED, "ebpf.enabled is false in the config", False)
        elif not requested.get(name, False):
            features[name] = FeatureMode(DISABLED, f"ebpf.{name}.enabled is false in the config",
                                         False)
        elif support is not None and not support.ok(name):
            features[name] = FeatureMode(DISABLED, support.reason(name) or "not supported here")
        elif name in failures:
            features[name] = FeatureMode(DISABLED, failures[name])
        elif name in degraded:
            features[name] = FeatureMode(DEGRADED, degraded[name])
        else:
            features[name] = FeatureMode(ACTIVE)
    return Modes(ebpf_enabled, features)
