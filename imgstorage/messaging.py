"""Every AMQP call of the project: request/reply for callers, consuming for daemons.

Callers (the CLI, and a NAS asking a VM container) publish to the direct
exchange with the node name as routing key, ``mandatory`` and publisher
confirms, so a request to a node that has no queue is returned at once
(``no such node``) instead of vanishing.  Replies come back through RabbitMQ's
direct reply-to pseudo-queue, so no queue is declared per call.  Each request
carries an expiration equal to the caller's timeout, an ``x-deadline-ms``
header (wall clock) and an ``x-timeout-ms`` header (relative): a request nobody
waits for any more is dropped by the broker or, if it was already delivered, by
the daemon before it runs.  The receiver takes the earlier of the two deadlines,
so a receiver whose clock runs behind the caller's never works past the point
where the caller stopped listening.

Daemons consume a durable queue named after the node (a quorum queue on a
broker cluster, declared by the administrator).  The message callback only
hands the message to the daemon's dispatcher; replies and acks made from
worker threads are marshalled back onto the connection's thread.  The consumer
reconnects with backoff, to whichever broker of ``broker_url`` answers, when
its broker goes away.

Trust: the broker validates each message's ``user_id`` against the
connection's user.  A caller takes a reply only from the node it asked (or its
own user); a daemon answers only direct reply-to addresses and never executes
a message that is a reply (``correlation_id`` or the reply header), so a
request cannot make one node act on another's answer.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pika
import pika.exceptions

from . import protocol
from .config import Config
from .errors import BrokerUnavailable, MessagingError, NoSuchNode, RemoteError, RpcTimeout

log = logging.getLogger(__name__)
# pika logs every returned message as a warning; a return is our "no such node" answer.
logging.getLogger("pika.adapters.blocking_connection").setLevel(logging.ERROR)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONTENT_TYPE = "application/json"
APP_ID = "imgstorage"


REPLY_HEADER = "x-imgstorage-reply"   # set on every reply, so none can pass for a request


def connection_parameters(config: Config, *, heartbeat: int = 60,
                          url: Optional[str] = None) -> pika.URLParameters:
    params = pika.URLParameters(url or config.broker_urls[0])
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.blocked_connection_timeout = 30
    params.heartbeat = heartbeat
    params.client_properties = {"connection_name": f"imgstorage:{config.name or 'cli'}"}
    return params


def broker_label(url: str) -> str:
    """host:port of one broker, for messages (never its credentials)."""
    params = pika.URLParameters(url)
    return f"{params.host}:{params.port}"


def _why_not(config: Config, url: str, exc: BaseException) -> str:
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return f"refused the credentials of user '{config.broker_user}'"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return f"denied access to the virtual host of {url.rsplit('/', 1)[-1]!r}"
    if isinstance(exc, OSError):
        return f"unreachable: {exc.strerror or exc}"
    return f"unreachable ({type(exc).__name__})"


def connect_any(config: Config) -> Tuple[pika.BlockingConnection, str]:
    """The first broker of ``config.broker_urls`` that answers, and its host:port.

    The brokers of a cluster are tried in their configured order, so every
    node prefers the same one and falls back to the next when it is gone.
    """
    urls = config.broker_urls
    failures = []
    for url in urls:
        try:
            return pika.BlockingConnection(connection_parameters(config, url=url)), broker_label(url)
        except (pika.exceptions.AMQPError, OSError) as exc:
            failures.append((url, exc))
    if len(failures) == 1:
        url, exc = failures[0]
        why = _why_not(config, url, exc)
        if why.startswith("unreachable"):
            detail = why[len("unreachable"):]
            raise BrokerUnavailable(f"cannot reach the message broker at {broker_label(url)}"
                                    f"{detail}") from None
        raise BrokerUnavailable(f"the message broker at {broker_label(url)} {why}") from None
    raise BrokerUnavailable("cannot reach any message broker of the cluster: " + "; ".join(
        f"{broker_label(url)} {_why_not(config, url, exc)}" for url, exc in failures)) from None


def connect(config: Config) -> pika.BlockingConnection:
    return connect_any(config)[0]


def declare_exchange(channel, exchange: str) -> None:
    channel.exchange_declare(exchange=exchange, exchange_type="direct", durable=True)


def ensure_exchange(conn: pika.BlockingConnection, exchange: str) -> None:
    """Declare the exchange only when it is missing.

    A node user has no right to declare anything (the administrator declared
    the exchange); a passive declare needs none.  A development setup with
    broad rights and nothing set up still gets its exchange.
    """
    probe = conn.channel()
    try:
        probe.exchange_declare(exchange=exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        declare_exchange(conn.channel(), exchange)
        return
    probe.close()


def close_quietly(conn: Optional[pika.BlockingConnection]) -> None:
    """Close a connection that may already be dead: closing must never mask the real error."""
    if conn is None:
        return
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001 - whatever a dead connection raises
        pass


def is_reply(props) -> bool:
    """Whether a message is a reply (it answers a request), which no daemon may execute."""
    return bool(props.correlation_id) or bool((props.headers or {}).get(REPLY_HEADER))


# ----------------------------------------------------------------- callers
class _ConnectionLost(Exception):
    """The broker connection broke under a call; the request may be sent again."""


class RpcClient:
    """Request/reply over one connection; not thread-safe (one per thread or call).

    A request that expects an answer is published without waiting for the
    broker's confirm: the answer confirms it, and a request no queue takes
    comes back at once (``mandatory``) as "no such node".  Waiting for the
    confirm cost a broker round trip per request, a third to a half of a
    listing's.  A notification has no answer, so it is confirmed, on a
    channel of its own.

    A reply is taken only from the node that was asked (the broker validates
    ``user_id``) or from the caller's own broker user (a setup where every
    node shares one user); anything else arriving on the reply pseudo-queue is
    dropped.  When the connection breaks while a request is sent or awaited,
    the request is sent again, with the same message id, through whichever
    broker of the cluster answers: the node's duplicate detection makes it run
    once, and the copy gets the answer.
    """

    def __init__(self, config: Config):
        self.config = config
        self._conn: Optional[pika.BlockingConnection] = None
        self._channel = None                    # requests, and their replies
        self._confirmed = None                  # notifications, with confirms
        self._replies: Dict[str, Dict[str, Any]] = {}
        self._returned: Dict[str, str] = {}     # message id -> why no queue took it
        self._asked: Dict[str, str] = {}        # message id -> node it was sent to
        self.broker: Optional[str] = None       # host:port of the broker in use

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self):
        if self._conn is not None and self._conn.is_open and self._channel is not None \
                and self._channel.is_open:
            return self._channel
        self.close()
        self._conn, self.broker = connect_any(self.config)
        try:
            ensure_exchange(self._conn, self.config.exchange)
            ch = self._conn.channel()
            ch.add_on_return_callback(self._on_return)
            ch.basic_consume(queue=DIRECT_REPLY_TO, on_message_callback=self._on_reply,
                             auto_ack=True)
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise BrokerUnavailable(f"message broker error while preparing a request: "
                                    f"{_amqp_reason(exc)}") from None
        self._channel = ch
        return ch

    def _confirming(self):
        """The channel notifications go out on (opened with the connection's first one)."""
        self._open()
        if self._confirmed is None or not self._confirmed.is_open:
            try:
                self._confirmed = self._conn.channel()
                self._confirmed.confirm_delivery()
            except pika.exceptions.AMQPError as exc:
                self.close()
                raise _ConnectionLost(f"lost the message broker while preparing a "
                                      f"notification ({type(exc).__name__})") from None
        return self._confirmed

    def _on_return(self, _ch, method, props, _body: bytes) -> None:
        """A request no queue took: its node does not exist (or has no queue yet)."""
        if props.message_id in self._asked:
            self._returned[props.message_id] = str(getattr(method, "reply_text", "NO_ROUTE"))

    def accepts(self, correlation_id: Optional[str], user_id: Optional[str]) -> bool:
        """Whether a reply comes from the node that was asked (or from our own user)."""
        node = self._asked.get(correlation_id or "")
        if node is None:
            return False
        return user_id is not None and user_id in (node, self.config.broker_user)

    def _on_reply(self, _ch, _method, props, body: bytes) -> None:
        if not self.accepts(props.correlation_id, props.user_id):
            log.warning("dropped a reply from broker user %r for %s: it answers no request "
                        "this caller sent to that node", props.user_id,
                        self._asked.get(props.correlation_id or "", "an unknown request"))
            return
        try:
            reply = protocol.decode(body, protocol.MAX_REPLY)
        except Exception as exc:  # a reply we cannot read is still an answer
            reply = {"action": "error", "status": "error", "error": f"unreadable reply: {exc}"}
        self._replies[props.correlation_id] = reply

    def _publish(self, node: str, message: Dict[str, Any], timeout: Optional[float],
                 reply: bool, message_id: str, deadline: Optional[float]) -> None:
        """Publish once; a broken connection raises _ConnectionLost (worth another try)."""
        ch = self._open() if reply else self._confirming()
        headers: Dict[str, Any] = {}
        expiration = None
        if timeout is not None:
            headers["x-deadline-ms"] = int((deadline or time.time() + timeout) * 1000)
            headers["x-timeout-ms"] = max(1, int(timeout * 1000))
            expiration = str(max(1, int(timeout * 1000)))
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=1, message_id=message_id,
            reply_to=DIRECT_REPLY_TO if reply else None, expiration=expiration,
            timestamp=int(time.time()), app_id=APP_ID, user_id=self.config.broker_user,
            headers=headers or None, type=message.get("action"))
        try:
            ch.basic_publish(exchange=self.config.exchange, routing_key=node,
                             body=protocol.encode(message), properties=props, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise NoSuchNode(node) from None
        except pika.exceptions.NackError:
            raise MessagingError(f"the message broker refused the request to {node}") from None
        except pika.exceptions.ChannelClosedByBroker as exc:   # the same again gets the same
            self.close()
            raise MessagingError(f"the message broker refused the request to {node}: "
                                 f"{_amqp_reason(exc)}") from None
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise _ConnectionLost(f"lost the message broker while sending to {node} "
                                  f"({type(exc).__name__})") from None

    def _send(self, node: str, message: Dict[str, Any], timeout: Optional[float], reply: bool,
              wait: Callable[[str, float], Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
        """Publish (again, after a lost connection) until ``wait`` has its answer."""
        message_id = uuid.uuid4().hex
        limit = timeout if timeout is not None else float(self.config.timeout)
        started = time.monotonic()
        deadline_wall = time.time() + timeout if timeout is not None else None
        self._asked[message_id] = node
        try:
            while True:
                remaining = limit - (time.monotonic() - started)
                if remaining <= 0:
                    raise RpcTimeout(node, limit)
                try:
                    self._publish(node, message, remaining if timeout is not None else None,
                                  reply, message_id, deadline_wall)
                    return wait(message_id, started + limit)
                except _ConnectionLost as exc:
                    self.close()
                    log.info("%s; sending %s %s again through the broker that answers", exc,
                                message.get("action"), message_id)
        finally:
            self._asked.pop(message_id, None)
            self._replies.pop(message_id, None)
            self._returned.pop(message_id, None)

    def _wait_reply(self, node: str, timeout: float):
        def wait(message_id: str, until: float) -> Dict[str, Any]:
            while message_id not in self._replies:
                if message_id in self._returned:
                    raise NoSuchNode(node)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise RpcTimeout(node, timeout)
                try:
                    self._conn.process_data_events(time_limit=min(remaining, 1.0))
                except pika.exceptions.AMQPError as exc:
                    self.close()
                    raise _ConnectionLost(f"lost the message broker while waiting for {node} "
                                          f"({type(exc).__name__})") from None
                if self._channel is not None and not self._channel.is_open:
                    # the broker closed the channel, not the connection: it refused the
                    # request itself (a user_id or a permission), and would again
                    why = getattr(self._channel, "_closing_reason", None)
                    self.close()
                    raise MessagingError(f"the message broker refused the request to {node}: "
                                         f"{_amqp_reason(why) if why else 'channel closed'}")
            return self._replies.pop(message_id)
        return wait

    def call(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        """Send ``message`` to ``node`` and return its reply (which may be an error reply)."""
        reply = self._send(node, message, timeout, True, self._wait_reply(node, timeout))
        assert reply is not None
        return reply

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        """Like call(), but an error reply raises RemoteError with the node's text."""
        reply = self.call(node, message, timeout)
        if reply.get("status") != "success":
            raise RemoteError(node, str(message.get("action")),
                              str(reply.get("error") or f"{node} reported an error"),
                              protocol.error_code(reply))
        return reply

    def notify(self, node: str, message: Dict[str, Any], timeout: Optional[float] = None) -> None:
        """Send a message that expects no reply (still refused when unroutable)."""
        self._send(node, message, timeout, False, lambda _id, _until: None)

    def keep_alive(self) -> bool:
        """Serve an idle connection's heartbeats; False when the broker let it go."""
        if self._conn is None:
            return True
        try:
            self._conn.process_data_events(time_limit=0)
        except pika.exceptions.AMQPError:
            self.close()
            return False
        return self._conn is not None and self._conn.is_open

    def close(self) -> None:
        conn, self._conn, self._channel, self._confirmed = self._conn, None, None, None
        close_quietly(conn)


class RpcPool:
    """Broker connections a daemon keeps open for its own requests to other nodes.

    An RpcClient serves one thread at a time, so each request takes a client
    of its own from the pool and gives it back when answered.  Opening a
    connection costs the caller several round trips and the broker a
    connection process; a NAS paid that for every question to a container
    (twice per map), fifty times at once in a boot storm.  A client comes
    back only after a normal answer (an error reply is one): one whose
    request timed out may still receive that late reply, and one whose
    broker failed is of no use.  At most ``keep`` clients are kept.

    An idle connection answers no heartbeats, and the broker drops it after a
    while.  Once started (a daemon's background part), the pool serves the
    heartbeats of its idle connections every ``SERVICE`` seconds and closes
    those unused for ``KEEP`` seconds; a pool that was not started closes
    those idle longer than ``IDLE`` seconds instead of reusing them.
    """

    IDLE = 30.0
    KEEP = 600.0
    SERVICE = 10.0

    def __init__(self, config: Config, keep: int = 16,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.keep = keep
        self.clock = clock
        self._lock = threading.Lock()
        self._idle: List[Tuple[float, RpcClient]] = []    # (given back at, client), oldest first
        self._closed = False
        self._stop = threading.Event()
        self._keeper: Optional[threading.Thread] = None

    @contextmanager
    def client(self) -> Iterator[RpcClient]:
        """A client for this thread's request(s), given back to the pool afterwards."""
        rpc = self._take()
        try:
            yield rpc
        except RemoteError:
            self._give_back(rpc)
            raise
        except BaseException:
            rpc.close()
            raise
        self._give_back(rpc)

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        with self.client() as rpc:
            return rpc.request(node, message, timeout)

    def notify(self, node: str, message: Dict[str, Any], timeout: Optional[float] = None) -> None:
        with self.client() as rpc:
            rpc.notify(node, message, timeout)

    def _take(self) -> RpcClient:
        now = self.clock()
        limit = self.KEEP if self._keeper is not None else self.IDLE
        with self._lock:
            stale = [rpc for at, rpc in self._idle if now - at > limit]
            self._idle = [(at, rpc) for at, rpc in self._idle if now - at <= limit]
            rpc = self._idle.pop()[1] if self._idle else None    # the newest
        for old in stale:
            old.close()
        return rpc if rpc is not None else RpcClient(self.config)

    def _give_back(self, rpc: RpcClient, at: Optional[float] = None) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append((self.clock() if at is None else at, rpc))
                self._idle.sort(key=lambda entry: entry[0])
                return
        rpc.close()

    def _serve_idle(self) -> None:
        """Heartbeats for every idle connection, one at a time; the unused long enough close."""
        with self._lock:
            waiting = list(self._idle)
        now = self.clock()
        for at, rpc in waiting:
            with self._lock:
                if (at, rpc) not in self._idle:
                    continue                # taken meanwhile: its user serves it
                self._idle.remove((at, rpc))
            if now - at > self.KEEP or not rpc.keep_alive():
                rpc.close()
            else:
                self._give_back(rpc, at)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.SERVICE):
            try:
                self._serve_idle()
            except Exception:  # a keeper that dies would let every connection go stale
                log.exception("serving the idle broker connections failed")

    def close(self) -> None:
        """Close every idle client; clients in use are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _at, rpc in idle:
            rpc.close()

    # a daemon's background part: stopped after the work that sends through it
    def start(self) -> None:
        self._keeper = threading.Thread(target=self._keep_alive, name="rpc-pool", daemon=True)
        self._keeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(10)
        self.close()


# ----------------------------------------------------------------- daemons
@dataclass
class Envelope:
    """One received message, with what a handler needs to answer it."""
    action: str
    body: Dict[str, Any]
    message_id: Optional[str]
    reply_to: Optional[str]
    user_id: Optional[str]
    deadline: Optional[float]          # wall-clock epoch, None = no deadline
    redelivered: bool = False
    received: float = field(default_factory=time.time)

    def remaining(self, default: float) -> float:
        """Seconds the caller still waits (``default`` if it set no deadline)."""
        if self.deadline is None:
            return default
        return self.deadline - time.time()

    def budget(self, default: float) -> float:
        """Seconds a handler may work and still have its answer reach the caller."""
        left = self.remaining(default)
        return max(1.0, left - answer_margin(left))

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def answer_margin(timeout: float) -> float:
    """Time kept back for the answer's way home: a tenth, between 1 and 5 seconds.

    A fixed second was too little on a slow node, where the reply itself, or
    the caller's own bookkeeping, can take longer than that.
    """
    return min(5.0, max(1.0, 0.1 * timeout))


def _deadline(headers: Dict[str, Any], now: float) -> Optional[float]:
    """The caller's deadline on our clock: the earlier of its wall-clock and relative ones."""
    found = []
    absolute = headers.get("x-deadline-ms")
    if isinstance(absolute, int) and not isinstance(absolute, bool):
        found.append(absolute / 1000.0)
    relative = headers.get("x-timeout-ms")
    if isinstance(relative, int) and not isinstance(relative, bool) and relative > 0:
        found.append(now + relative / 1000.0)
    return min(found) if found else None


def capped_deadline(headers: Dict[str, Any], now: float, max_time: float) -> Optional[float]:
    """The caller's deadline, but never more than ``max_time`` after arrival.

    A request's own headers must not let it hold a zvol lock or a worker
    longer than the node allows, whatever its sender asks for.
    """
    asked = _deadline(headers, now)
    if asked is None:
        return None
    return min(asked, now + max_time)


class Responder:
    """Reply to and acknowledge one message from any thread."""

    def __init__(self, consumer: "Consumer", generation: int, delivery_tag: int,
                 reply_to: Optional[str], message_id: Optional[str]):
        self._consumer = consumer
        self._generation = generation
        self._tag = delivery_tag
        self._reply_to = reply_to
        self._message_id = message_id
        self._done = False

        self._reply: Optional[Dict[str, Any]] = None

    def reply(self, message: Dict[str, Any]) -> None:
        """The answer, sent by done(): one hand-over to the connection's thread, not two."""
        if self._reply_to:
            self._reply = message

    def done(self) -> None:
        """Send the answer (if any), then acknowledge the request: never the other way
        round, so a request is redelivered rather than left unanswered."""
        if not self._done:
            self._done = True
            self._consumer.answer(self._generation, self._tag, self._reply_to,
                                  self._message_id, self._reply)


Dispatcher = Callable[[Optional[Envelope], Responder, Optional[str]], None]


class Consumer:
    """Consume the node's queue forever, reconnecting with backoff."""

    PREFETCH = 64

    def __init__(self, config: Config, dispatch: Dispatcher,
                 on_connected: Optional[Callable[[], None]] = None,
                 busy: Optional[Callable[[], bool]] = None, prefetch: Optional[int] = None):
        config.require("name")
        self.config = config
        self.prefetch = prefetch or self.PREFETCH   # unacknowledged requests held at once
        self.queue = config.name
        self.dispatch = dispatch
        self.on_connected = on_connected
        self.busy = busy or (lambda: False)
        self._stop = threading.Event()
        self._conn: Optional[pika.BlockingConnection] = None
        self._channel = None
        self._generation = 0
        self.connected = threading.Event()
        self.broker: Optional[str] = None      # host:port of the broker consumed from
        self._reply_conn: Optional[pika.BlockingConnection] = None
        self._reply_ch = None

    # -- called from any thread -------------------------------------------
    def _threadsafe(self, generation: int, fn: Callable[[], None]) -> None:
        conn = self._conn
        if conn is None or generation != self._generation:
            log.warning("connection to the broker was lost; a reply or acknowledgement is dropped")
            return
        try:
            conn.add_callback_threadsafe(fn)
        except Exception as exc:
            log.warning("cannot hand work back to the broker connection: %r", exc)

    def answer(self, generation: int, tag: int, reply_to: Optional[str],
               correlation_id: Optional[str], message: Optional[Dict[str, Any]]) -> None:
        """Publish ``message`` to ``reply_to`` (when both are given), then acknowledge."""
        def send() -> None:
            if message is not None and reply_to:
                self._send_reply(generation, reply_to, correlation_id, message)
            self._ack(generation, tag)
        self._threadsafe(generation, send)

    def _send_reply(self, generation: int, reply_to: str, correlation_id: Optional[str],
                    message: Dict[str, Any]) -> None:
        if generation != self._generation or self._channel is None:
            return
        props = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=1,
                                     correlation_id=correlation_id, app_id=APP_ID,
                                     timestamp=int(time.time()),
                                     user_id=self.config.broker_user,
                                     headers={REPLY_HEADER: 1})
        body = protocol.encode(message)
        if len(body) > protocol.MAX_REPLY:
            log.error("a %s reply of %d bytes is over the %d bytes a reply may carry; "
                      "answering with an error instead", message.get("action"), len(body),
                      protocol.MAX_REPLY)
            body = protocol.encode(protocol.oversized(message, len(body)))
        try:
            self._reply_channel().basic_publish(exchange="", routing_key=reply_to,
                                                body=body, properties=props)
        except (MessagingError, pika.exceptions.AMQPError) as exc:
            self._close_replies()
            log.warning("could not send a reply to %s (its caller is gone?): %s",
                        reply_to, exc if isinstance(exc, MessagingError) else _amqp_reason(exc))

    def _reply_channel(self):
        """The channel replies go out on: a connection of their own, with confirms.

        A reply addressed to a caller whose broker node died makes the broker
        close the connection it was published on; on the consuming connection
        that would drop every unacknowledged request and, redelivered, they
        would be answered to the same dead address again.  Confirms tell at
        once which reply broke its connection, so the next one gets a new one.
        """
        if self._reply_conn is None or not self._reply_conn.is_open \
                or self._reply_ch is None or not self._reply_ch.is_open:
            self._close_replies()
            self._reply_conn, _label = connect_any(self.config)
            self._reply_ch = self._reply_conn.channel()
            self._reply_ch.confirm_delivery()
        return self._reply_ch

    def _close_replies(self) -> None:
        conn, self._reply_conn, self._reply_ch = self._reply_conn, None, None
        close_quietly(conn)

    def _ack(self, generation: int, tag: int) -> None:
        if generation != self._generation or self._channel is None:
            return
        try:
            self._channel.basic_ack(delivery_tag=tag)
        except pika.exceptions.AMQPError as exc:
            log.warning("could not acknowledge message: %r", exc)

    def stop(self) -> None:
        self._stop.set()

    # -- the connection's thread -------------------------------------------
    def _on_message(self, _ch, method, props, body: bytes) -> None:
        responder = Responder(self, self._generation, method.delivery_tag, props.reply_to,
                              props.message_id)
        if is_reply(props):
            # Someone routed an answer to this node's queue: executing it as a request
            # would let any publisher make this daemon act on another node's reply.
            log.warning("dropped a reply (from broker user %r) that arrived on queue %s: "
                        "replies are never executed", props.user_id, self.queue)
            responder.done()
            return
        if props.reply_to and not props.reply_to.startswith(DIRECT_REPLY_TO):
            log.warning("refused a request from broker user %r: its reply_to %r is not a "
                        "direct reply-to address, and no answer is sent to a queue",
                        props.user_id, props.reply_to[:200])
            responder.done()
            return
        try:
            msg = protocol.decode(body)
        except Exception as exc:
            self.dispatch(None, responder, str(exc))
            return
        now = time.time()
        deadline = capped_deadline(props.headers or {}, now, self.config.max_request_time)
        env = Envelope(action=msg["action"], body=msg, message_id=props.message_id,
                       reply_to=props.reply_to, user_id=props.user_id, deadline=deadline,
                       redelivered=bool(method.redelivered), received=now)
        self.dispatch(env, responder, None)

    def _setup(self) -> str:
        """Connect and consume the node's queue; returns the broker's host:port.

        A node user may not declare anything: its queue (a quorum queue on a
        cluster) and binding were declared by the administrator, so a passive
        declare comes first.  Only a missing queue is declared here, which a
        development setup with broad rights needs and a strict one refuses.
        """
        self._conn, label = connect_any(self.config)
        self._generation += 1
        probe = self._conn.channel()
        try:
            probe.queue_declare(queue=self.queue, passive=True)
            probe.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self._declare_own_queue(label)
        ch = self._conn.channel()
        ch.basic_qos(prefetch_count=self.prefetch)
        self._consumer_tag = ch.basic_consume(queue=self.queue,
                                              on_message_callback=self._on_message)
        self._channel = ch
        return label

    def _declare_own_queue(self, label: str) -> None:
        try:
            ensure_exchange(self._conn, self.config.exchange)
            ch = self._conn.channel()
            ch.queue_declare(queue=self.queue, durable=True)
            ch.queue_bind(queue=self.queue, exchange=self.config.exchange,
                          routing_key=self.queue)
            ch.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:
                raise MessagingError(
                    f"queue {self.queue} does not exist on the message broker at {label} and "
                    f"this user may not create it: run `rocks sync host imgstorage "
                    f"{self.queue}` on the frontend") from None
            raise

    def run_forever(self) -> None:
        """Serve until stop(); a lost broker is retried with backoff (1 s .. 30 s)."""
        delay = 1.0
        first = True
        while not self._stop.is_set():
            try:
                label = self._setup()
            except (MessagingError, pika.exceptions.AMQPError) as exc:
                text = str(exc) if isinstance(exc, MessagingError) else \
                    f"message broker error while consuming queue {self.queue}: {_amqp_reason(exc)}"
                log.warning("%s; retrying in %.0f s", text, delay)
                self._close()
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.broker = label
            log.info("%s to the message broker at %s; consuming queue %s",
                     "connected" if first else "reconnected", label, self.queue)
            first = False
            delay = 1.0
            self.connected.set()
            if self.on_connected:
                self.on_connected()
            try:
                while not self._stop.is_set():
                    if not self._conn.is_open:   # closed by the broker inside a callback
                        raise pika.exceptions.ConnectionClosed(320, "connection closed")
                    self._conn.process_data_events(time_limit=0.5)
                    self._service_replies()
                self._drain()
            except pika.exceptions.AMQPError as exc:
                log.warning("lost the message broker (%s); reconnecting", type(exc).__name__)
            finally:
                self.connected.clear()
                self._close()
        log.info("stopped consuming queue %s", self.queue)

    def _drain(self, limit: float = 600.0) -> None:
        """Stop taking messages, but keep the connection while work in flight replies."""
        self._channel.basic_cancel(self._consumer_tag)
        deadline = time.monotonic() + limit
        while self.busy() and time.monotonic() < deadline and self._conn.is_open:
            self._conn.process_data_events(time_limit=0.2)
            self._service_replies()
        self._conn.process_data_events(time_limit=0)

    def _service_replies(self) -> None:
        """Heartbeats and a broker's close of the reply connection, between messages."""
        if self._reply_conn is not None:
            try:
                self._reply_conn.process_data_events(time_limit=0)
            except pika.exceptions.AMQPError:
                self._close_replies()

    def _close(self) -> None:
        self._close_replies()
        conn, self._conn, self._channel = self._conn, None, None
        close_quietly(conn)


# ----------------------------------------------------------- administration
QUORUM_ARGS = {"x-queue-type": "quorum"}


def supports_quorum(conn: pika.BlockingConnection) -> bool:
    """Quorum queues exist from RabbitMQ 3.8 on; older brokers get classic durable queues."""
    props = getattr(conn._impl, "server_properties", None) or {}
    version = props.get("version", b"")
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    try:
        major, minor = (int(part) for part in str(version).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 8)


def declare_node_queues(config: Config, nodes: Iterable[str],
                        quorum: Optional[bool] = None) -> Dict[str, str]:
    """Declare the exchange and each node's queue and binding, with ``config``'s credentials.

    Run by the administrator (``rocks sync host imgstorage``), so that node
    users need no right to declare or bind anything.  ``quorum`` None means
    "quorum queues where the broker has them".  A queue that already exists
    keeps its type: converting it would mean deleting it, and the requests
    in it.  Returns ``{node: "quorum" | "classic"}``.
    """
    conn = connect(config)
    kinds: Dict[str, str] = {}
    try:
        want_quorum = supports_quorum(conn) if quorum is None else quorum
        ch = conn.channel()
        declare_exchange(ch, config.exchange)
        for node in nodes:
            kind = _existing_queue_kind(conn, node)
            if kind is None:
                ch.queue_declare(queue=node, durable=True,
                                 arguments=dict(QUORUM_ARGS) if want_quorum else None)
                kind = "quorum" if want_quorum else "classic"
            elif (kind == "quorum") != bool(want_quorum):
                log.warning("queue %s already exists as a %s queue and stays one (converting "
                            "it would drop the requests in it)", node, kind)
            ch.queue_bind(queue=node, exchange=config.exchange, routing_key=node)
            kinds[node] = kind
    except pika.exceptions.AMQPError as exc:
        raise MessagingError(f"the message broker refused to declare the node queues: "
                             f"{_amqp_reason(exc)}") from None
    finally:
        close_quietly(conn)
    return kinds


def _existing_queue_kind(conn: pika.BlockingConnection, queue: str) -> Optional[str]:
    """"quorum" or "classic" for an existing queue, None when there is none.

    A passive declare cannot tell the type, so the queue is declared again
    with quorum arguments on a throwaway channel: the broker accepts that only
    for a quorum queue (any other kind closes the channel with 406).
    """
    probe = conn.channel()
    try:
        probe.queue_declare(queue=queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    try:
        probe.queue_declare(queue=queue, durable=True, arguments=dict(QUORUM_ARGS))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            return "classic"
        raise
    finally:
        if probe.is_open:
            probe.close()
    return "quorum"


def delete_node_queue(config: Config, node: str) -> None:
    """Delete a removed node's queue, with the administrator's rights (none there is fine)."""
    conn = connect(config)
    try:
        conn.channel().queue_delete(queue=node)
    except pika.exceptions.AMQPError as exc:
        raise MessagingError(f"the message broker refused to delete queue {node}: "
                             f"{_amqp_reason(exc)}") from None
    finally:
        close_quietly(conn)


def _amqp_reason(exc: BaseException) -> str:
    text = getattr(exc, "reply_text", None)
    return str(text) if text else type(exc).__name__
