"""Is a host name known on this network?  Asked before a target is created for it.

The real answer comes from the resolver (DNS or /etc/hosts).  In the simulated
cluster a host exists when it has a folder under ``sim_root``.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

from ..config import Config


def host_known(config: Config, host: str) -> bool:
    if config.backend == "sim":
        return (Path(config.sim_root) / host.split(".", 1)[0]).is_dir()
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def network_name(config: Config, host: str) -> Optional[str]:
    """``<host>.<network>`` when a storage network is configured and resolves, else ``host``."""
    if config.network:
        candidate = f"{host}.{config.network}"
        if host_known(config, candidate):
            return candidate
    return host if host_known(config, host) else None
