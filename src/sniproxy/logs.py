"""Logging setup: level from --log-level, SNI_PROXY_LOG or config; plain or JSON; stderr or a file.

The access log (logger ``sniproxy.access``) gets one line per connection.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error", "critical")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = getattr(record, "fields", None)
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        if data is not None:
            out.update(data)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        data = getattr(record, "fields", None)
        if data is not None:
            record.msg = " ".join(f"{k}={_plain(v)}" for k, v in data.items())
            record.args = None
        return super().format(record)


def _plain(value) -> str:
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def resolve_level(cli_level: str | None, config_level: str | None) -> str:
    """--log-level beats SNI_PROXY_LOG beats the config file."""
    for candidate, source in ((cli_level, "--log-level"), (os.environ.get("SNI_PROXY_LOG"), "SNI_PROXY_LOG"),
                              (config_level, "log.level")):
        if candidate:
            level = candidate.lower()
            if level == "warn":
                level = "warning"
            if level not in LEVELS:
                raise ValueError(f"{source}: got {candidate!r}: expected one of {', '.join(LEVELS)}")
            return level
    return "info"


def setup_logging(level: str, fmt: str = "plain", file: str | None = None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
