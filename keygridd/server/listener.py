"""The Unix socket: creation, socket activation, peer credentials, accept loop.

* A socket passed by systemd (``LISTEN_FDS``/``LISTEN_PID``, fd 3) is used as is.
* Otherwise the path is bound with the configured mode and group. A socket file
  left by a crash (nobody accepts on it) is replaced; a live daemon on the
  same path is refused with ``AddressInUse``.
* Every accepted connection's peer is read with ``SO_PEERCRED`` (uid, gid, pid)
  plus its supplementary groups from ``/proc/PID/status``.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct

from keygridd.core.model import Peer

SD_LISTEN_FDS_START = 3


class AddressInUse(Exception):
    """Another process serves the socket path."""


def _activated_socket() -> socket.socket | None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX:
        raise OSError(errno.EINVAL, "the socket passed by systemd is not a Unix socket")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sock


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AddressInUse(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a daemon that died
        return
    finally:
        probe.close()
    raise AddressInUse(f"another daemon is serving {path}")


def _group_id(group: str | int | None) -> int:
    if group is None:
        return -1
    if isinstance(group, int) or group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def open_socket(path: str, mode: int, group: str | int | None, backlog: int = 128) -> tuple[socket.socket, bool]:
    """The listening socket, and whether it was passed by systemd."""
    activated = _activated_socket()
    if activated is not None:
        return activated, True
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    gid = _group_id(group)
    if gid >= 0:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock, False


def supplementary_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(uid=uid, gid=gid, pid=pid, groups=supplementary_groups(pid))


def notify(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
