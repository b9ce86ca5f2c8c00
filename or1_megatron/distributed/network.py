"""Which network interface a rank's gloo traffic uses.

Gloo binds to the address the machine's hostname resolves to, unless GLOO_SOCKET_IFNAME names an
interface. Where the hostname resolves to a loopback address (Debian's 127.0.1.1, containers,
network namespaces), rank 0 then advertises 127.0.0.1 and a rank on another node cannot connect
("Gloo connectFullMesh failed ... remote=[127.0.0.1]"). A rank that knows its node's address
(Ray's node IP) binds gloo to the interface that holds it.
"""
from __future__ import annotations

import os
import socket

import psutil


def interface_of(address: str) -> str | None:
    """The name of the interface that holds IPv4 `address`, or None."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addresses):
            return name
    return None


def bind_gloo_to(address: str) -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface of `address` unless the user set it; the name."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    name = interface_of(address)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name
