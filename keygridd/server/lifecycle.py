"""Running the daemon: build slots from settings, serve, shut down cleanly.

Start: providers are looked up by entry point and their options validated,
each slot's token store opened (and initialised from ``slots[].token`` when it
is not yet), then the socket is opened and ``READY=1`` sent to systemd.
SIGTERM/SIGINT: stop accepting and reading new requests, let in-flight calls
finish for up to ``shutdown_grace_seconds``, then close everything.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from keygridd import signer
from keygridd.config import AccessList, Settings
from keygridd.core.core import Core
from keygridd.core.model import Peer, Slot
from keygridd.core.offload import may_busy_poll
from keygridd.core.remote import RemoteToken
from keygridd.pkcs11 import CKU
from keygridd.providers.base import PassthroughProvider, Provider
from keygridd.server.connection import Applications, Connection
from keygridd.server.dispatch import Dispatcher
from keygridd.server.listener import notify, open_socket, peer_of
from keygridd.server.rawstream import RawStream
from keygridd.server.reactor import Reactor

log = logging.getLogger("keygridd")


@dataclass
class Daemon:
    settings: Settings
    core: Core
    providers: dict[int, Provider]

    @classmethod
    def build(cls, settings: Settings, options: dict[int, Any], lookup: Callable[[str], type[Provider]]) -> Daemon:
        providers: dict[int, Provider] = {}
        slots: list[Slot] = []
        remote: list[RemoteToken] = []
        for slot_settings in settings.slots:
            provider = lookup(slot_settings.provider)(slot_settings.id, options[slot_settings.id])
            access = slot_settings.access
            providers[slot_settings.id] = provider
            allows = functools.partial(_allows, access)
            if isinstance(provider, PassthroughProvider):
                remote.append(provider.token(slot_settings.description, allows))
                continue
            store = provider.open_store()
            if slot_settings.token is not None and not store.initialized:
                init = slot_settings.token
                store.init_token(init.so_pin.encode(), init.label.encode().ljust(32, b" "))
                if init.user_pin is not None:
                    store.init_pin(init.user_pin.encode())
                store.lock()  # keys unlocked to initialise are not kept
            slots.append(
                Slot(
                    slot_id=slot_settings.id,
                    description=slot_settings.description,
                    provider=slot_settings.provider,
                    store=store,
                    mechanisms=provider.mechanisms(),
                    allows=allows,
                )
            )
        return cls(settings, Core(slots, remote), providers)

    def summary(self) -> list[str]:
        lines = [f"socket: {self.settings.server.socket}"]
        for slot in sorted(self.core.slots.values(), key=lambda s: s.slot_id):
            label = slot.store.label.decode("utf-8", "replace").rstrip(" ") or "(not initialised)"
            lines.append(f"slot {slot.slot_id}: {slot.provider} token '{label}' - {slot.description}")
        for token in sorted(self.core.remote.values(), key=lambda t: t.slot_id):
            where = f"label '{token.label}'" if token.label is not None else f"serial '{token.serial}'"
            lines.append(f"slot {token.slot_id}: {token.provider} token with {where} - {token.description}")
        return lines

    def close(self) -> None:
        for slot in self.core.slots.values():
            slot.store.close()
        for provider in self.providers.values():
            provider.close()


async def serve(daemon: Daemon, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    server = daemon.settings.server
    dispatcher = Dispatcher(
        daemon.core, daemon.providers, trio.CapacityLimiter(server.worker_threads), server.max_attributes
    )
    apps = Applications(dispatcher)
    reactor = Reactor(server.busy_poll_microseconds)
    if server.ecdsa_thread:
        dispatcher.signer = signer.start(server.ecdsa_precompute)
        dispatcher.hand_over = reactor.crowded
        if dispatcher.signer is not None:
            reactor.signing = dispatcher.signer.busy
    may_busy_poll.set(reactor.nobody_waiting)  # module calls stop polling for their reply when a client waits
    sock, activated = open_socket(server.socket, server.socket_mode, server.socket_group)
    sock.setblocking(False)
    connections: set[Connection] = set()
    accepting = trio.CancelScope()
    listening = True

    def close_listener() -> None:
        nonlocal listening
        if listening:
            listening = False
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def handle(client: socket.socket) -> None:
        stream = RawStream(client, reactor)
        try:
            peer = peer_of(client)
        except OSError:
            await stream.aclose()
            return
        if len(connections) >= server.max_connections:
            log.warning("refusing pid %d: %d connections open", peer.pid, len(connections))
            await stream.aclose()
            return
        conn = Connection(stream, peer, apps, server.max_frame_bytes, server.max_attributes, reactor)
        connections.add(conn)
        try:
            await conn.serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; only its connection ends
        except Exception:
            log.exception("connection of pid %d failed", peer.pid)
        finally:
            connections.discard(conn)
            await stream.aclose()

    async def stop_on_signal(nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                accepting.cancel()
                close_listener()  # new clients are refused at once, not left in the backlog
                for conn in list(connections):
                    conn.read_scope.cancel()
                with trio.move_on_after(server.shutdown_grace_seconds):
                    while connections:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:

            async def accept(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                with accepting:
                    while True:
                        await trio.lowlevel.wait_readable(sock)
                        try:
                            client, _ = sock.accept()
                        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                            continue
                        except OSError as exc:
                            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                                raise
                            log.error("cannot accept connections: %s", exc)
                            await trio.sleep(0.1)  # out of descriptors: retry, do not spin
                            continue
                        nursery.start_soon(handle, client)

            nursery.start_soon(stop_on_signal, nursery)
            await nursery.start(reactor.run)
            watch_stores(daemon.core, nursery)
            for provider in daemon.providers.values():
                if isinstance(provider, PassthroughProvider):
                    await nursery.start(provider.run)
            await nursery.start(accept)
            notify("READY=1")
            task_status.started(server.socket)
            log.info("serving on %s%s", server.socket, " (socket activation)" if activated else "")
    finally:
        notify("STOPPING=1")
        close_listener()
        if dispatcher.signer is not None:
            dispatcher.signer.close()
        reactor.close()
        if not activated:
            with contextlib.suppress(OSError):
                os.unlink(server.socket)


def watch_stores(core: Core, nursery: trio.Nursery) -> None:
    """Apply changes other daemons make to shared stores: the store calls back from its own thread."""
    token = trio.lowlevel.current_trio_token()
    limiter = trio.CapacityLimiter(1)

    for slot in core.slots.values():

        async def reload(oid: bytes, slot: Slot = slot) -> None:
            try:
                await trio.to_thread.run_sync(slot.store.load_object, oid, limiter=limiter)
            except Exception:
                log.exception("slot %d: cannot re-read a changed object", slot.slot_id)
                return
            # Take the newest state the store knows *now*: a local write may have finished while the
            # re-read ran, and its result must not be replaced by the older state read.
            attrs = slot.store.current(oid)
            slot.apply(oid, None if attrs is None else dict(attrs))

        def changed(oid: bytes, reload: Callable[[bytes], Awaitable[None]] = reload) -> None:
            try:
                token.run_sync_soon(nursery.start_soon, reload, oid)
            except trio.RunFinishedError:
                pass  # the daemon is stopping

        slot.store.watch(changed)


def _allows(access: AccessList, peer: Peer) -> bool:
    return access.allows(peer.uid, peer.gid, peer.groups)


def anonymous_peer() -> Peer:
    return Peer(uid=-1, gid=-1, pid=0)


__all__ = ["CKU", "Daemon", "serve"]
