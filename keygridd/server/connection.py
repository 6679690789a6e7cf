"""One client connection: handshake, frames in, concurrent requests, frames out.

Requests on one session are processed in arrival order (a chain of events per
session); requests on different sessions, and slot-level calls, run
concurrently. At most ``MAX_IN_FLIGHT`` requests of a connection run at once:
beyond that the connection stops reading (back-pressure). A framing error
(bad length, malformed MessagePack, a first request that is not ``hello``)
gets a FATAL message and the connection is closed; every other bad request
gets its CKR and the connection goes on.

A connection with nothing in flight whose last request was answered at once
parks with the reactor (``keygridd.server.reactor``), which reads it and
answers what completes on the loop (``on_readable``) without waking the
connection's task. A module call that can go out at once is started there
too (``forward``): the reactor holds the connection until the module's reply,
then the request finishes on the loop (``forwarded``). Whatever else must
wait comes back to the task as a ``Step``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

import keygridd
from keygridd.core.model import Application, Peer
from keygridd.core.offload import Forward, Offload
from keygridd.pkcs11 import CKR
from keygridd.pkcs11.errors import PKCS11Error
from keygridd.protocol import codec
from keygridd.protocol.calls import BY_NAME, FEATURES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Call, Lock
from keygridd.protocol.framing import HEADER, FrameReader, FramingError
from keygridd.server.dispatch import Dispatcher, Pending
from keygridd.server.rawstream import RawStream
from keygridd.server.reactor import MAX_FRAMES_PER_TURN, Reactor

log = logging.getLogger("keygridd.connection")

MAX_IN_FLIGHT = 64
MAX_UNYIELDED = 16
EOF = object()  # next_message's answer when the peer closed the connection between frames
# What became of a request the reactor began (answer_frame):
ANSWERED, FORWARDED, HANDED = 0, 1, 2  # its reply is in the outbox; a module works on it; the task has it


_SESSION, _APP = Lock.SESSION, Lock.APP  # read on every request: module globals are read faster


def _is_request(message: Any) -> bool:
    """``[0, id, method, args]`` with integers that are not booleans."""
    return (
        isinstance(message, list)
        and len(message) == 4
        and type(message[0]) is int
        and message[0] == codec.REQUEST
        and type(message[1]) is int
    )


def _awaited(request: Offload | Forward | None) -> bool:
    """Does the task await this request itself: a module call, or an ECDSA signature left for the signer
    (which the task computes inline)?"""
    return isinstance(request, Forward) or (isinstance(request, Offload) and request.job is not None)


async def forward_later(requests: list[Forward]) -> None:
    """Module calls left over when an application went away (closing its sessions there)."""
    for request in requests:
        try:
            await request.backend.call(request.method, request.args)
        except Exception as exc:
            log.debug("%s for an application that left: %s", request.method, exc)


class ProtocolViolation(Exception):
    """The peer broke the framing or handshake rules: close the connection."""


@dataclass(slots=True)
class Step:
    """A request begun but not answered: it waits for an earlier call of its session (``previous``),
    or for the rest of its work (``outcome``)."""

    msgid: int
    call: Call
    args: list[Any]
    key: Any
    previous: trio.Event | None
    outcome: Pending | None


@dataclass
class Applications:
    """Applications by id, with the number of connections each has."""

    dispatcher: Dispatcher
    refs: dict[bytes, int] = field(default_factory=dict)

    def join(self, app_id: bytes | None, peer: Peer) -> Application:
        core = self.dispatcher.core
        if app_id is None:
            app = core.open_application(secrets.token_bytes(16), peer)
        else:
            found = core.apps.get(app_id)
            if found is None or found.peer.pid != peer.pid or found.peer.uid != peer.uid:
                raise ProtocolViolation("unknown application id for this peer")
            app = found
        self.refs[app.app_id] = self.refs.get(app.app_id, 0) + 1
        return app

    def leave(self, app: Application) -> None:
        count = self.refs.get(app.app_id, 0) - 1
        if count <= 0:
            self.refs.pop(app.app_id, None)
            core = self.dispatcher.core
            core.close_application(app)
            if core.passthrough.background:
                later, core.passthrough.background = core.passthrough.background, []
                trio.lowlevel.spawn_system_task(forward_later, later)
        else:
            self.refs[app.app_id] = count


class Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: Peer,
        apps: Applications,
        max_frame: int,
        max_attributes: int,
        reactor: Reactor | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.apps = apps
        self.dispatcher = apps.dispatcher
        self.max_frame = max_frame
        self.max_attributes = max_attributes
        self.reader = FrameReader(max_frame)
        self.send_lock = trio.Lock()
        self.slots = trio.Semaphore(MAX_IN_FLIGHT)
        self.tails: dict[Any, trio.Event] = {}
        self.app: Application | None = None
        self.read_scope = trio.CancelScope()
        self.unyielded = 0
        self.outbox: list[bytes] = []
        self._pack = codec.packer()  # the connection's own: it is used from the loop's thread only
        self.raw = stream if type(stream) is RawStream else None  # the hot path's stream, checked once
        self.reactor = reactor if self.raw is not None else None
        # What the reactor hands over when it wakes the task (see on_readable):
        self.handed: Step | None = None  # a request it began that has more to do
        self.failure: Exception | None = None  # a protocol error (or a bug) to end the connection with
        self.at_eof = False  # the peer closed or reset: read through the stream, never park again
        # Did the last request have to wait (a module call, a worker thread)? Then the task reads the
        # next one itself: handing each request of a module's slot from the reactor to the task would
        # cost a task switch per call for nothing.
        self.waited = False

    def encode(self, message: list[Any]) -> bytes:
        body = self._pack(message)
        if len(body) > self.max_frame:
            rv = CKR.DEVICE_MEMORY
            body = codec.pack([message[0], message[1], rv, None, f"reply of {len(body)} bytes exceeds the frame limit"])
        return HEADER.pack(len(body)) + body  # a MessagePack value is never empty

    async def send(self, message: list[Any]) -> None:
        await self.write(self.encode(message))

    async def flush(self) -> None:
        """Send the replies held back while pipelined requests were being answered."""
        if self.outbox:
            data, self.outbox = b"".join(self.outbox), []
            await self.write(data)

    async def write(self, frame: bytes) -> None:
        if self.raw is not None and not self.send_lock.locked():
            # Nobody else is writing and nothing below awaits before the send: no lock needed
            # unless the socket takes only part of the frame.
            sent = self.raw.send_nowait(frame)
            if sent == len(frame):
                return
            frame = frame[sent:]
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            await self.stream.send_all(frame)
        finally:
            self.send_lock.release()

    async def next_message(self) -> Any:
        """The next decoded message, a ``Step`` the reactor began, or ``EOF`` when the peer closed
        between frames."""
        while True:
            if self.handed is not None:
                step, self.handed = self.handed, None
                return step
            if self.failure is not None:
                failure, self.failure = self.failure, None
                raise failure
            body = self.reader.next_frame()
            if body is not None:
                return self.decode(body)
            try:
                await self.flush()  # nothing more to read at once: what was answered goes out now
                if self.reactor is not None and self.idle():
                    await self.reactor.wait(self)  # until the reactor hands something over
                    continue
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # the peer reset the connection: as good as closed
            if not data:
                if self.reader.pending:
                    raise ProtocolViolation("connection closed inside a frame")
                return EOF
            self.reader.feed(bytes(data))

    def decode(self, body: bytes) -> Any:
        try:
            return codec.unpack(body)
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None

    def idle(self) -> bool:
        """May the reactor watch this connection? Past the handshake, its last request answered at once,
        nothing in flight, nothing to send."""
        return (
            self.app is not None
            and not self.waited
            and not self.at_eof
            and not self.outbox
            and self.slots.value == MAX_IN_FLIGHT
        )

    def fileno(self) -> int:
        assert self.raw is not None
        return self.raw.sock.fileno()

    def on_readable(self) -> bool:
        """The reactor's turn: read, answer the requests that complete on the loop, send the replies.
        False hands the connection back to its task, with what it must carry on with."""
        assert self.raw is not None
        try:
            data = self.raw.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.at_eof = True
            return False
        try:
            body = self.reader.take_whole(data)
            if body is not None:  # one request, the usual read
                state = self.answer_frame(body)
            else:
                self.reader.feed(data)
                state = self.answer_buffered()
            if state == HANDED:
                return False
            sent = self.send_outbox()
            return sent or state == FORWARDED  # held: what the socket did not take goes with the module's reply
        except Exception as exc:  # a bug: the task ends the connection with it
            self.failure = exc
            return False

    def answer_buffered(self) -> int:
        """Begin the requests read but not yet begun, up to a turn's worth; stop at one a module works on."""
        for _ in range(MAX_FRAMES_PER_TURN):
            try:
                body = self.reader.next_frame()
            except FramingError:
                return HANDED  # the task meets it again and closes the connection
            if body is None:
                return ANSWERED
            state = self.answer_frame(body)
            if state != ANSWERED:
                return state
        return HANDED if self.reader.has_frame() else ANSWERED  # the task answers more than a turn's worth

    def answer_frame(self, body: bytes) -> int:
        """Begin one request for the reactor: ANSWERED on the loop, FORWARDED to a module (the
        connection is held), or HANDED to the task (the ``Step`` begun, or the protocol error)."""
        assert self.app is not None
        try:
            step = self.begin(self.app, self.decode(body))
        except ProtocolViolation as exc:
            self.failure = exc
            return HANDED
        if step is None:
            return ANSWERED
        if step.previous is None and self.forward(step):
            return FORWARDED
        self.handed = step
        return HANDED

    def forward(self, step: Step) -> bool:
        """Start the step's module call from the loop, if it can go out at once; the reactor holds the
        connection until ``forwarded``."""
        outcome, reactor = step.outcome, self.reactor
        if outcome is None or reactor is None:
            return False
        request = outcome.request
        if isinstance(request, Forward):
            if not request.backend.submit(request.method, request.args, partial(self.forwarded, step), reactor):
                return False
        elif isinstance(request, Offload) and request.job is not None and self.dispatcher.signer is not None:
            if not self.dispatcher.signer.submit(request.job, partial(self.forwarded, step), reactor):
                return False
        else:
            return False
        reactor.hold(self.fileno())
        return True

    def forwarded(self, step: Step, value: Any, error: Exception | None) -> None:
        """The module call of a held connection's request is done (called in the reactor's turn): finish
        the request, begin the ones read behind it, then read again; or hand over to the task."""
        reactor, fd = self.reactor, self.fileno()
        if reactor is None or not reactor.holds(fd, self):
            return  # the task was cancelled meanwhile: the connection is gone
        try:
            assert step.outcome is not None
            outcome = self.dispatcher.resume(step.outcome, value, error)
            if isinstance(outcome, Pending):
                step.outcome = outcome
                if self.forward(step):
                    return  # its next module call
                self.handed = step
                reactor.wake(fd)
                return
            rv, result, text = outcome
            self.outbox.append(self.encode([codec.RESPONSE, step.msgid, int(rv), result, text]))
            state = self.answer_buffered()
            if state == HANDED:
                reactor.wake(fd)
                return
            sent = self.send_outbox()
            if state == FORWARDED:
                return
            if sent and not self.at_eof:
                reactor.release(fd)
            else:
                reactor.wake(fd)  # the task sends the rest, or meets the end of the connection
        except Exception as exc:  # a bug: the task ends the connection with it
            self.failure = exc
            reactor.wake(fd)

    def send_outbox(self) -> bool:
        """The reactor's write: False when the socket did not take it all (or the peer is gone)."""
        assert self.raw is not None
        if self.outbox:
            data, self.outbox = b"".join(self.outbox), []
            try:
                sent = self.raw.send_nowait(data)
            except trio.BrokenResourceError:
                self.at_eof = True
                return False
            if sent < len(data):
                self.outbox = [data[sent:]]  # the task sends the rest when the socket takes it
                return False
        return True

    async def handshake(self) -> Application | None:
        message = await self.next_message()
        if message is EOF:
            return None
        if not _is_request(message):
            raise ProtocolViolation("expected a request")
        _, msgid, method, args = message
        if method != "hello" or not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict)):
            raise ProtocolViolation("the first request must be hello")
        request = args[0]
        versions = request.get("versions", [1, 1])
        if not (isinstance(versions, list) and len(versions) == 2 and all(type(v) is int for v in versions)):
            raise ProtocolViolation("hello: versions must be [min, max]")
        low, high = max(versions[0], PROTOCOL_VERSION_MIN), min(versions[1], PROTOCOL_VERSION_MAX)
        if low > high:
            await self.send([codec.RESPONSE, msgid, CKR.FUNCTION_FAILED, None, "no common protocol version"])
            raise ProtocolViolation("no common protocol version")
        app_id = request.get("app_id")
        if app_id is not None and not isinstance(app_id, bytes):
            raise ProtocolViolation("hello: app_id must be binary")
        app = self.apps.join(app_id, self.peer)
        wanted = request.get("features", [])
        features = [f for f in FEATURES if isinstance(wanted, list) and f in wanted]
        try:
            await self.send(
                [
                    codec.RESPONSE,
                    msgid,
                    CKR.OK,
                    {
                        "version": high,
                        "features": features,
                        "app_id": app.app_id,
                        "server": f"keygridd {keygridd.__version__}",
                        "limits": {"max_frame": self.max_frame, "max_attributes": self.max_attributes},
                    },
                    None,
                ]
            )
        except BaseException:
            self.apps.leave(app)
            raise
        return app

    async def serve(self) -> None:
        try:
            app = await self.handshake()
        except (ProtocolViolation, FramingError) as exc:
            await self.fatal(str(exc))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # gone before the handshake finished
        if app is None:
            return
        self.app = app
        try:
            async with trio.open_nursery() as nursery:
                with self.read_scope:
                    try:
                        await self.read_loop(app, nursery)
                    except (ProtocolViolation, FramingError) as exc:
                        await self.fatal(str(exc))
                        nursery.cancel_scope.cancel()
                        return
                    if not self.read_scope.cancelled_caught:
                        nursery.cancel_scope.cancel()  # peer gone: abandon its in-flight calls
                if self.outbox:  # stopped reading (shutdown) with answers held back: they still go out
                    with trio.CancelScope(shield=True):
                        try:
                            await self.flush()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
        finally:
            self.apps.leave(app)

    async def read_loop(self, app: Application, nursery: trio.Nursery) -> None:
        while True:
            message = await self.next_message()
            if message is EOF:
                return
            if isinstance(message, Step):
                step: Step | None = message
            else:
                self.unyielded += 1
                if self.unyielded >= MAX_UNYIELDED:
                    # Requests that never had to wait for the socket do not pass through the scheduler:
                    # let other connections run now and then.
                    self.unyielded = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                step = self.begin(app, message)
            # A module call the task awaits leaves the connection to the reactor after it (the reactor
            # starts the next one itself when a lane is free); other waits keep it with its task.
            self.waited = step is not None and not (step.outcome is not None and _awaited(step.outcome.request))
            if step is None:
                await self.answered()
                continue
            outcome = step.outcome
            if (
                outcome is not None
                and _awaited(outcome.request)
                and (not self.reader.has_frame() or self.next_request_waits_for(step.key))
            ):
                # A module call with nothing else of this connection waiting, or only a request of the
                # same session (the module's deferred inits come with the call after them): await it
                # here rather than in a task of its own (the shim makes one call at a time per
                # connection). What the connection sends meanwhile is read once the call is done.
                rv, result, text = await self.dispatcher.finish(outcome)
                await self.answer([codec.RESPONSE, step.msgid, int(rv), result, text])
                continue
            await self.slots.acquire()
            done = trio.Event()
            if step.key is not None:
                self.tails[step.key] = done
            nursery.start_soon(
                self.run_request, app, step.msgid, step.call, step.args, outcome, step.previous, done, step.key
            )

    def begin(self, app: Application, message: Any) -> Step | None:
        """Start a request on the loop: None when it is answered (its reply waits in the outbox),
        else what is left to do."""
        if not _is_request(message):
            raise ProtocolViolation("expected [0, id, method, args]")
        _, msgid, method, raw_args = message
        try:
            call, args = self.dispatcher.prepare(app, method, raw_args)
        except PKCS11Error as exc:
            self.outbox.append(self.encode([codec.RESPONSE, msgid, exc.rv, None, exc.message or None]))
            return None
        key: Any = None
        lock = call.lock
        if lock is _SESSION:
            key = ("session", args[0])
        elif lock is _APP:
            key = ("app",)
        previous = self.tails.get(key) if key is not None and self.tails else None
        if previous is not None:
            return Step(msgid, call, args, key, previous, None)
        # Nothing of this session in flight, so run it now, on the loop.
        outcome = self.dispatcher.start(app, call, args)
        if not isinstance(outcome, Pending):
            rv, result, text = outcome
            self.outbox.append(self.encode([codec.RESPONSE, msgid, int(rv), result, text]))
            return None
        return Step(msgid, call, args, key, None, outcome)

    def next_request_waits_for(self, key: Any) -> bool:
        """Is the next buffered request one of the session ``key`` names, so that it waits for the
        call before it anyway? (The frame stays buffered; anything unexpected answers no.)"""
        if key is None or key[0] != "session":
            return False
        body = self.reader.peek_frame()
        if body is None:
            return False
        try:
            message = codec.unpack(body)
        except ValueError:
            return False
        if not _is_request(message) or type(message[3]) is not list or not message[3]:
            return False
        call = BY_NAME.get(message[2]) if isinstance(message[2], str) else None
        return call is not None and call.lock is Lock.SESSION and message[3][0] == key[1]

    async def answer(self, message: list[Any]) -> None:
        """Reply from the reading loop: held back while the client has pipelined more requests,
        so that one write answers them all, and sent in the order the requests came."""
        self.outbox.append(self.encode(message))
        await self.answered()

    async def answered(self) -> None:
        """Send what the outbox holds, unless the client has pipelined more requests."""
        if not self.reader.has_frame():
            try:
                await self.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def reply(self, msgid: int, outcome: tuple[int, Any, str | None]) -> None:
        rv, result, message = outcome
        try:
            await self.send([codec.RESPONSE, msgid, int(rv), result, message])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def run_request(
        self,
        app: Application,
        msgid: int,
        call: Any,
        args: list[Any],
        started: Pending | None,
        previous: trio.Event | None,
        done: trio.Event,
        key: Any,
    ) -> None:
        try:
            if started is not None:
                outcome = await self.dispatcher.finish(started)
            else:
                if previous is not None:
                    await previous.wait()
                outcome = await self.dispatcher.dispatch(app, call, args)
            await self.reply(msgid, outcome)
        finally:
            done.set()
            if key is not None and self.tails.get(key) is done:
                del self.tails[key]
            self.slots.release()

    async def fatal(self, message: str) -> None:
        log.warning("closing connection of pid %d: %s", self.peer.pid, message)
        try:
            self.outbox.append(self.encode([codec.FATAL, 0, CKR.ARGUMENTS_BAD, message]))
            await self.flush()  # answers to the requests before the bad one, then the error
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
