"""A machine without network, for the tests: every socket connection outside the loopback raises, as on
a machine with no route out (ENETUNREACH), and so does every name lookup but localhost's.

A Python process that has this folder on its PYTHONPATH runs this at start-up (site imports
`sitecustomize`); the tests' `no_network` fixture (conftest.py) calls `cut` in-process and puts the
folder on PYTHONPATH for the subprocesses they start.
"""

import errno
import ipaddress
import os
import socket

LOCAL_NAMES = ("localhost", "localhost.localdomain")


def address(host):
    """The IP address `host` spells, or None for a name."""
    try:
        return ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return None


def is_loopback(host):
    return address(host).is_loopback if address(host) else str(host).lower() in LOCAL_NAMES


def outside(sock, peer):
    return sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(peer[0])


def guard_connect(connect):
    def guarded(sock, peer):
        if outside(sock, peer):
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        return connect(sock, peer)

    return guarded


def guard_connect_ex(connect_ex):
    def guarded(sock, peer):
        return errno.ENETUNREACH if outside(sock, peer) else connect_ex(sock, peer)

    return guarded


def guard_getaddrinfo(getaddrinfo):
    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and address(name) is None and name.lower() not in LOCAL_NAMES:  # an address needs no lookup
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return getaddrinfo(host, *args, **kwargs)

    return guarded


def cut(patch=setattr):
    """Cut this process off the network; `patch(owner, name, value)` sets each guard (pytest's
    monkeypatch.setattr undoes them after a test)."""
    patch(socket.socket, "connect", guard_connect(socket.socket.connect))
    patch(socket.socket, "connect_ex", guard_connect_ex(socket.socket.connect_ex))
    patch(socket, "getaddrinfo", guard_getaddrinfo(socket.getaddrinfo))


if __name__ == "sitecustomize":
    cut()
