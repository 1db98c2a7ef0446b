"""What both daemons share: logging, signals, the worker pools and dispatch.

The broker connection's thread only decodes and dispatches; every handler runs
on a worker so a slow zvol never blocks the message loop or another zvol.
Quick read-only actions get their own pool so a listing still answers while
every worker is busy.

A request's worker spends nearly all its time waiting: on the kernel (a
``zfs create``, an iSCSI login) or on another node's answer.  So there are
many of them (``request_workers``), not as many as the host has cores, and
not the number of transfers a NAS runs at once (``img_sync_workers``, which
bounds disk and network work): fifty VMs booting at once must not queue
behind eight workers that are all asleep in ``iscsiadm``.  The broker hands
the daemon as many unanswered requests as it has workers of both kinds, so a
listing is never stuck in the broker behind a queue of maps.
"""
from __future__ import annotations

import logging
import logging.handlers
import signal
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional

from . import protocol
from .config import Config
from .errors import INTERNAL, UNKNOWN_ACTION, ForbiddenError, ImgStorageError, ValidationError
from .logformat import formatter
from .messaging import Consumer, Envelope, Responder
from .metrics import DUPLICATE, EXPIRED, UNKNOWN, Metrics

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Optional[dict]]

QUICK_WORKERS = 16     # listings and pings: short, but some wait on the kernel too


def setup_logging(config: Config, debug: bool = False, stream=None) -> None:
    """Send the process's log to ``log_file`` (else standard error) in ``log_format``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if config.log_file:
        from pathlib import Path
        Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.WatchedFileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(config.log_format, config.name))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pika").setLevel(logging.WARNING)


class SeenMessages:
    """Recent message ids, so a request delivered twice runs once.

    A broker redelivers what a lost connection left unacknowledged, and a
    caller whose broker died sends its request again with the same id; the
    second copy gets the first one's answer instead of doing the work again
    (while the first still runs, its responder waits for that answer).  What
    is remembered is bounded in entries and in bytes (a reply's encoded size
    plus its id), oldest forgotten first, so large listings cannot make a
    node keep unbounded memory.
    """

    RUNNING = object()

    def __init__(self, size: int = 4096, max_bytes: int = 16 * 1024 * 1024):
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self._ids: "OrderedDict[str, _Seen]" = OrderedDict()

    def check(self, message_id: Optional[str], waiter: Optional[Responder] = None):
        """None for a new id (now marked running), else RUNNING or the earlier reply.

        ``waiter`` is kept for a request still running, and handed back by
        finish() so that it gets the answer too.
        """
        if not message_id:
            return None
        with self._lock:
            seen = self._ids.get(message_id)
            if seen is not None:
                if seen.running:
                    if waiter is not None:
                        seen.waiters.append(waiter)
                    return self.RUNNING
                return seen.reply
            self._remember(message_id, _Seen(cost=len(message_id)))
        return None

    def finish(self, message_id: Optional[str], reply: Optional[dict]) -> List[Responder]:
        """Record the answer; returns the responders of copies that arrived meanwhile."""
        if not message_id:
            return []
        with self._lock:
            seen = self._ids.pop(message_id, None)
            if seen is not None:
                self.bytes -= seen.cost
            cost = len(message_id) + (protocol.encoded_size(reply) if reply is not None else 0)
            self._remember(message_id, _Seen(cost=cost, running=False, reply=reply))
            return seen.waiters if seen is not None else []

    def _remember(self, message_id: str, seen: "_Seen") -> None:
        self._ids[message_id] = seen
        self.bytes += seen.cost
        while self._ids and (len(self._ids) > self.size or self.bytes > self.max_bytes):
            _id, old = self._ids.popitem(last=False)
            self.bytes -= old.cost


class _Seen:
    __slots__ = ("cost", "running", "reply", "waiters")

    def __init__(self, cost: int, running: bool = True, reply: Optional[dict] = None):
        self.cost = cost
        self.running = running
        self.reply = reply
        self.waiters: List[Responder] = []


class Daemon:
    """Route each request to its handler on a worker and send the reply."""

    def __init__(self, config: Config, handlers: Dict[str, Handler],
                 quick_actions: Iterable[str] = (), workers: Optional[int] = None,
                 background: Iterable[object] = (), restricted: Iterable[str] = (),
                 metrics: Optional[Metrics] = None):
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(config.name or "", "node")
        self.metrics.expect_requests(handlers)
        self.background = list(background)   # objects with start() and stop()
        self.restricted = set(restricted)     # actions only admin_users may ask for
        self.seen = SeenMessages()
        self.handlers = handlers
        self.quick_actions = set(quick_actions)
        workers = workers or config.request_workers
        self.work_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="work")
        self.quick_pool = ThreadPoolExecutor(max_workers=QUICK_WORKERS,
                                             thread_name_prefix="quick")
        self._inflight = {"work": 0, "quick": 0}     # requests held by each pool
        self._inflight_lock = threading.Lock()
        self._connections = 0
        self.consumer = Consumer(config, self.dispatch, on_connected=self._connected,
                                 busy=lambda: any(self._inflight.values()),
                                 prefetch=workers + QUICK_WORKERS)
        self.metrics.add_pool("work", workers, lambda: self._inflight["work"])
        self.metrics.add_pool("quick", QUICK_WORKERS, lambda: self._inflight["quick"])
        self.metrics.broker_connected = self.consumer.connected.is_set

    def _connected(self) -> None:
        self._connections += 1
        if self._connections > 1:
            self.metrics.reconnected()
        self.on_connected()

    def on_connected(self) -> None:
        """Hook for subclasses; runs on every (re)connection."""

    def refuse(self, env: Envelope) -> Optional[str]:
        """Why this caller may not ask for this action (None: it may).

        The broker validates ``user_id`` against the connection's user, so a
        container's credentials cannot pass for an administrator's.
        """
        admins = self.config.admin_users
        if not admins or env.action not in self.restricted:
            return None
        if env.user_id in admins:
            return None
        who = env.user_id or "an unidentified user"
        return f"{who} is not allowed to ask for {env.action} on {self.config.name}"

    def dispatch(self, env: Optional[Envelope], responder: Responder,
                 decode_error: Optional[str]) -> None:
        if env is None:
            log.warning("rejected a message: %s", decode_error)
            self.metrics.request(UNKNOWN, ValidationError.code)
            responder.reply(protocol.error(None, decode_error or "malformed message",
                                           ValidationError.code))
            responder.done()
            return
        if env.expired:
            log.warning("dropped %s %s: its caller stopped waiting before it could run",
                        env.action, env.message_id)
            self.metrics.request(env.action if env.action in self.handlers else UNKNOWN, EXPIRED)
            responder.done()
            return
        handler = self.handlers.get(env.action)
        if handler is None:
            log.warning("rejected unknown action %r from %s", env.action, env.user_id)
            self.metrics.request(UNKNOWN, UNKNOWN_ACTION)
            responder.reply(protocol.error(env.action, f"unknown action: {env.action[:80]}",
                                           UNKNOWN_ACTION))
            responder.done()
            return
        refusal = self.refuse(env)
        if refusal:
            log.warning("refused %s from broker user %r: %s", env.action, env.user_id, refusal)
            self.metrics.request(env.action, ForbiddenError.code)
            responder.reply(protocol.error(env.action, refusal, ForbiddenError.code))
            responder.done()
            return
        quick = env.action in self.quick_actions
        # a quick action only reads: a second copy may as well run again, and a
        # listing's reply is not worth remembering (nor encoding once more to weigh it)
        earlier = None if quick else self.seen.check(env.message_id, waiter=responder)
        if earlier is not None:
            self.metrics.request(env.action, DUPLICATE)
            if earlier is not SeenMessages.RUNNING:
                log.info("%s %s was already answered; sending the same answer again",
                         env.action, env.message_id)
                responder.reply(earlier)
                responder.done()
            else:   # answered (and acknowledged) when the first copy finishes
                log.info("%s %s is already being handled; not running it twice, its answer "
                         "will go to this copy too", env.action, env.message_id)
            return
        pool = "quick" if quick else "work"
        with self._inflight_lock:
            self._inflight[pool] += 1
        (self.quick_pool if quick else self.work_pool).submit(
            self._run, handler, env, responder, not quick, pool)

    def _run(self, handler: Handler, env: Envelope, responder: Responder,
             remember: bool = True, pool: str = "work") -> None:
        reply: Optional[dict]
        try:
            reply = handler(env)
        except ImgStorageError as exc:
            log.info("%s %s failed: %s", env.action, _subject(env), exc)
            reply = protocol.error(env.action, str(exc), exc.code)
        except Exception as exc:  # a bug: keep serving, tell the caller, keep the traceback
            log.exception("%s %s: unexpected error", env.action, _subject(env))
            reply = protocol.error(env.action, f"internal error in {env.action}: {exc}",
                                   INTERNAL)
        waiters = self.seen.finish(env.message_id, reply) if remember else []
        took = time.time() - env.received
        failed = reply is not None and reply.get("status") != "success"
        self.metrics.request(env.action, protocol.error_code(reply) if failed else "success", took)
        log.debug("%s %s from %s answered %s in %.3fs", env.action, _subject(env), env.user_id,
                  (reply or {}).get("status", "nothing"), took)
        try:
            # the newest copy first: an older one's caller may have lost its broker
            for each in waiters[::-1] + [responder]:
                try:
                    if reply is not None:
                        each.reply(reply)
                finally:
                    each.done()
        finally:
            with self._inflight_lock:
                self._inflight[pool] -= 1

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; in-flight work is allowed to finish."""
        def _stop(signum, _frame) -> None:
            log.info("received signal %d, stopping after in-flight work", signum)
            self.consumer.stop()
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        for part in self.background:
            part.start()
        try:
            self.consumer.run_forever()
        finally:
            for part in reversed(self.background):
                part.stop()
            self.work_pool.shutdown(wait=True)
            self.quick_pool.shutdown(wait=True)
        return 0


def _subject(env: Envelope) -> str:
    zvol = env.body.get("zvol")
    return f"of {zvol}" if isinstance(zvol, str) else ""


def command_line(program: str, summary: str, build: Callable[[Config], Daemon],
                 announce: Callable[[Config], None] = lambda cfg: None):
    """The click command both daemons share: --config, --debug, --check-config."""
    import click

    from . import config as config_mod
    from .errors import ConfigError

    @click.command(name=program, help=summary,
                   context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--config", "config_path", metavar="PATH",
                  help="Configuration file (default: $IMGSTORAGE_CONF or /etc/imgstorage.conf).")
    @click.option("--debug", is_flag=True, help="Log every command and message.")
    @click.option("--check-config", is_flag=True, help="Check the configuration and exit.")
    def cli(config_path: Optional[str], debug: bool, check_config: bool) -> None:
        try:
            cfg = config_mod.load(config_path)
            cfg.require("name", "db", "broker_url")
        except ConfigError as exc:
            click.echo(f"{program}: {exc}", err=True)
            sys.exit(2)
        if check_config:
            click.echo(f"{cfg.path}: configuration is valid")
            return
        setup_logging(cfg, debug)
        try:
            daemon = build(cfg)
        except ImgStorageError as exc:
            log.error("%s cannot start: %s", program, exc)
            click.echo(f"{program}: {exc}", err=True)
            sys.exit(1)
        log.info("%s %s starting (backend %s, database %s)", program, cfg.name, cfg.backend, cfg.db,
                 extra={"event": "start"})
        announce(cfg)
        sys.exit(daemon.serve())

    return cli
