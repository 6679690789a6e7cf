"""``keygridd``: the daemon's command line.

``keygridd --config FILE`` serves; ``keygridd --check-config FILE`` only
validates the configuration (exit 0 when good, 2 with a message naming the
key and the problem when not).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import trio

import keygridd
from keygridd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    load_config,
    validate_provider_options,
)
from keygridd.providers import registry
from keygridd.server.lifecycle import Daemon, serve
from keygridd.server.listener import AddressInUse


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level.upper())


def load(path: str | None) -> tuple[Settings, dict[int, Any]]:
    settings = load_config(path)
    source = str(path) if path is not None else os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    options = validate_provider_options(settings, registry.load, registry.names(), source=source)
    return settings, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keygridd", description="KeyGrid PKCS#11 key daemon")
    parser.add_argument(
        "--config", metavar="FILE", help="configuration file (default: $KEYGRID_CONFIG or /etc/keygrid/keygrid.yaml)"
    )
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE and exit")
    parser.add_argument("--version", action="version", version=f"keygridd {keygridd.__version__}")
    args = parser.parse_args(argv)
    try:
        settings, options = load(args.check_config or args.config)
    except ConfigError as exc:
        print(f"keygridd: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{args.check_config}: configuration OK ({len(settings.slots)} slots)")
        return 0
    configure_logging(settings)
    log = logging.getLogger("keygridd")
    try:
        daemon = Daemon.build(settings, options, registry.load)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    for line in daemon.summary():
        log.info("%s", line)
    try:
        trio.run(serve, daemon)
    except AddressInUse as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        daemon.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
