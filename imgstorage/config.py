"""Node configuration: ``/etc/imgstorage.conf`` or the file in ``IMGSTORAGE_CONF``.

The file is JSON: one object (the original tools wrote a list holding one
object; that is accepted too).  Every key is checked here, once, so that a
daemon with a bad configuration refuses to start with one line naming the key
instead of failing later in the middle of an operation.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from . import naming
from .errors import ConfigError, ValidationError

DEFAULT_PATH = "/etc/imgstorage.conf"
ENV_VAR = "IMGSTORAGE_CONF"
DEFAULT_EXCHANGE = "rocks.vm-manage"
# On the simulated kernel every node is a process on one machine: node names do
# not resolve, so streams are offered and reached on the loopback address.
SIM_STREAM_ADDRESS = "127.0.0.1"

KNOWN_KEYS = {
    "name", "broker_url", "exchange", "db", "frontend_db", "backend", "sim_root",
    "network", "default_pool", "img_sync_workers", "transport", "log_file",
    "admin_users", "chap", "timeout", "target", "stream_address", "stream_bind", "ssh_user",
    "pool_wait", "nas_users", "max_streams", "max_request_time", "broker_node", "sim_latency",
    "request_workers", "metrics_port", "metrics_bind", "log_format",
}


@dataclass
class Config:
    """A checked node configuration.  ``path`` says where it came from."""

    path: str
    name: Optional[str] = None
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = DEFAULT_EXCHANGE
    db: Optional[str] = None
    frontend_db: Optional[str] = None
    backend: str = "real"
    sim_root: Optional[str] = None
    network: Optional[str] = None
    default_pool: Optional[str] = None
    img_sync_workers: int = 8             # copies and pulls a NAS runs at once
    request_workers: int = 64             # requests a node works on at once
    transport: str = "ssh"
    log_file: Optional[str] = None
    log_format: str = "text"               # "json": one object per line, for log shippers
    admin_users: Optional[List[str]] = None
    chap: bool = True
    timeout: float = 60.0
    target: str = "lio"
    stream_address: Optional[str] = None   # how peers reach this node's TCP streams
    stream_bind: Optional[str] = None      # None: the storage address (stream_address)
    ssh_user: str = "img-storage"
    pool_wait: float = 300.0               # seconds a starting daemon waits for its pools
    nas_users: Optional[List[str]] = None  # broker users of the NASes that may use a container
    max_streams: int = 16                  # stream endpoints a node keeps open at once
    max_request_time: float = 3600.0       # the longest any request may hold a lock or worker
    broker_node: Optional[str] = None      # the RabbitMQ node rabbitmqctl talks to (frontend)
    sim_latency: Dict[str, float] = field(default_factory=dict)  # seconds per simulated subsystem
    metrics_port: Optional[int] = None     # the Prometheus endpoint's port; None: no endpoint
    metrics_bind: str = "127.0.0.1"        # the address it listens on
    extra: Dict[str, Any] = field(default_factory=dict)

    def require(self, *keys: str) -> None:
        """Fail with one line for the first of ``keys`` that is not set."""
        for key in keys:
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"{self.path}: missing key '{key}'")

    @property
    def broker_urls(self) -> List[str]:
        """The brokers of a cluster, in the order they are tried."""
        return split_broker_urls(self.broker_url)

    @property
    def broker_user(self) -> str:
        return urlparse(self.broker_urls[0]).username or "guest"

    @property
    def strict(self) -> bool:
        """Whether callers are checked: only when admin_users names the administrators."""
        return bool(self.admin_users)


def split_broker_urls(value: str) -> List[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _bad(path: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: invalid key '{key}': {why}")


def config_path(explicit: Optional[str] = None) -> str:
    return explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(explicit: Optional[str] = None) -> Config:
    """Read and check the configuration; raise ConfigError naming the bad key."""
    path = config_path(explicit)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (set {ENV_VAR} to use another)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_dict(data, path)


def from_dict(data: Dict[str, Any], path: str = "<config>") -> Config:
    cfg = Config(path=path)
    for key, value in data.items():
        if key not in KNOWN_KEYS:
            cfg.extra[key] = value
            continue
        if value is None:
            continue
        setattr(cfg, key, _check(path, key, value))
    if cfg.sim_latency and cfg.backend != "sim":
        raise ConfigError(f"{path}: invalid key 'sim_latency': only the simulated kernel "
                          "(backend \"sim\") has one")
    if cfg.backend == "sim" and not cfg.sim_root:
        raise ConfigError(f"{path}: missing key 'sim_root' (required when backend is \"sim\")")
    if cfg.backend == "sim":
        given = {key for key, value in data.items() if value is not None}
        if "stream_address" not in given:
            cfg.stream_address = SIM_STREAM_ADDRESS
        if "stream_bind" not in given:
            cfg.stream_bind = SIM_STREAM_ADDRESS
    return cfg


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60:
        raise ValidationError("expected seconds between 0 and 60")
    return float(value)


def _latency(value: Any) -> Dict[str, float]:
    """One number for every subsystem, or seconds per subsystem (missing ones: 0)."""
    from .drivers.sim.latency import SUBSYSTEMS
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SUBSYSTEMS))
        if unknown:
            raise ValidationError(f"unknown subsystem {str(unknown[0])[:40]!r}: use "
                                  + ", ".join(SUBSYSTEMS))
        return {name: _seconds(seconds) for name, seconds in value.items()}
    return {name: _seconds(value) for name in SUBSYSTEMS}


def _check(path: str, key: str, value: Any) -> Any:
    try:
        if key == "name":
            return naming.host_name(value)
        if key == "network":
            if not isinstance(value, str) or (value and not naming._HOST_RE.match(value)):
                raise ValidationError("expected a network name such as 'ibnet'")
            return value or None
        if key == "default_pool":
            return naming.zpool_name(value)
        if key == "broker_url":
            if not isinstance(value, str) or not split_broker_urls(value):
                raise ValidationError("expected amqp://user:pass@host:5672/vhost")
            users = set()
            for part in split_broker_urls(value):
                url = urlparse(part)
                if url.scheme not in ("amqp", "amqps") or not url.hostname:
                    raise ValidationError("expected amqp://user:pass@host:5672/vhost "
                                          "(several separated by commas)")
                users.add(url.username or "guest")
            if len(users) > 1:
                raise ValidationError("every broker of a cluster must be given the same user")
            return value
        if key == "exchange":
            if not isinstance(value, str) or not value or len(value) > 255:
                raise ValidationError("expected an exchange name")
            return value
        if key in ("db", "frontend_db", "sim_root", "log_file"):
            if not isinstance(value, str) or not value:
                raise ValidationError("expected a file path")
            return value
        if key == "backend":
            if value not in ("real", "sim"):
                raise ValidationError('expected "real" or "sim"')
            return value
        if key in ("stream_address", "stream_bind", "metrics_bind"):
            if not isinstance(value, str) or not naming.is_host_or_ip(value):
                raise ValidationError("expected a host name or an IP address")
            return value
        if key == "ssh_user":
            if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
                raise ValidationError("expected a user name")
            return value
        if key == "target":
            if value not in ("lio", "tgt"):
                raise ValidationError('expected "lio" or "tgt"')
            return value
        if key == "log_format":
            if value not in ("text", "json"):
                raise ValidationError('expected "text" or "json"')
            return value
        if key == "transport":
            if value not in ("ssh", "tcp"):
                raise ValidationError('expected "ssh" or "tcp"')
            return value
        if key == "img_sync_workers":
            n = naming.non_negative_int(key, value, allow_none=False, minimum=1)
            if n > 256:
                raise ValidationError("at most 256")
            return n
        if key == "request_workers":
            n = naming.non_negative_int(key, value, allow_none=False, minimum=1)
            if n > 1024:
                raise ValidationError("at most 1024")
            return n
        if key in ("admin_users", "nas_users"):
            if not isinstance(value, list) or not all(isinstance(u, str) and u for u in value):
                raise ValidationError("expected a list of broker user names")
            return value
        if key == "sim_latency":
            return _latency(value)
        if key == "broker_node":
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?",
                                                              value):
                raise ValidationError("expected a RabbitMQ node name such as rabbit@frontend")
            return value
        if key == "metrics_port":
            n = naming.non_negative_int(key, value, allow_none=False, minimum=1)
            if n > 65535:
                raise ValidationError("expected a TCP port number, 1 to 65535")
            return n
        if key == "max_streams":
            n = naming.non_negative_int(key, value, allow_none=False, minimum=1)
            if n > 1024:
                raise ValidationError("at most 1024")
            return n
        if key == "max_request_time":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 10:
                raise ValidationError("expected a number of seconds, at least 10")
            return float(value)
        if key == "chap":
            return naming.parse_bool(value, key)
        if key == "pool_wait":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValidationError("expected a number of seconds (0: do not wait)")
            return float(value)
        if key == "timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValidationError("expected a positive number of seconds")
            return float(value)
    except ValidationError as exc:
        raise _bad(path, key, str(exc)) from None
    raise AssertionError(key)  # pragma: no cover - KNOWN_KEYS and _check agree
