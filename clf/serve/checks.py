"""jobs.serve's checks, before Ray starts; they import neither torch nor Ray."""

from __future__ import annotations

import socket
from typing import Any

from clf.artifact.meta import check_format_in, read_meta
from clf.config import ServeConfig
from clf.errors import UsageError


def check_serve(cfg: ServeConfig) -> dict[str, Any]:
    """``jobs.serve``'s flags and model; returns the artifact's meta."""
    cfg.validate()
    meta = read_meta(cfg.model)
    check_format_in(meta, cfg.model, cfg.format)
    return meta


def check_address_free(host: str, port: int) -> None:
    """The HTTP address binds here: Serve's proxy would otherwise fail after Ray started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UsageError(f"--host {host}: not an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As Serve's proxy binds: a port whose last connections are closing is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            what = "in use" if e.errno == 98 else f"not available here ({e.strerror})"
            raise UsageError(f"--host {host} --port {port}: the address is {what}") from None
