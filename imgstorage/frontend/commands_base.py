"""What every ``rocks`` command shares: its declaration, its parsing, its context.

A command is declared once (words, arguments, ``key=value`` parameters, help,
an example) and the click layer in ``cli.py`` is generated from that, so the
help an operator reads and the checks the parser makes can never disagree.
The Rocks syntax (positional arguments, then ``key=value`` parameters) is not
something click parses natively, which is why the words are split here.

The command modules import from here and never from ``cli.py``, which
imports them; that keeps the imports free of cycles.

What only some commands need is imported when one of them first needs it:
the broker client (pika) when a command talks to a node, the registry's
mapped classes (SQLAlchemy) when a command writes the registry or asks it
more than a read-only lookup (lookup.py) answers, the hypervisor driver when
a command starts or stops a VM.  A listing then starts in a fraction of the
time it took to import all of them.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import click

from .. import config as config_mod
from .. import naming
from ..config import Config
from ..errors import MessagingError, NoSuchNode, ValidationError
from .lookup import HostQueries, RegistryReader
from .tables import OutputOptions, Table

if TYPE_CHECKING:
    from .. import messaging
    from .registry import Host, Registry


def RpcClient(config: Config) -> "messaging.RpcClient":  # noqa: N802 - stands in for the class
    """A command's broker connection (pika is imported by the first command that talks)."""
    from ..messaging import RpcClient as client
    return client(config)


def hypervisor(config: Config):
    """The hypervisor driver, for the commands that start and stop VMs."""
    from ..drivers import hypervisor as driver
    return driver(config)


class CommandUsageError(ValidationError):
    """The command line itself is malformed (exit status 2, like any usage error)."""


@dataclass(frozen=True)
class Arg:
    """A positional argument.  ``keyword`` lets it be given as ``keyword=value`` too."""

    name: str
    help: str
    required: bool = True
    many: bool = False
    keyword: Optional[str] = None

    @property
    def key(self) -> str:
        return self.keyword or self.name.lower()

    @property
    def usage(self) -> str:
        text = self.name + ("..." if self.many else "")
        return text if self.required else f"[{text}]"


@dataclass(frozen=True)
class Param:
    """A ``key=value`` parameter."""

    key: str
    metavar: str
    help: str
    required: bool = False

    @property
    def usage(self) -> str:
        text = f"{self.key}={self.metavar}"
        return text if self.required else f"[{text}]"


COMMON_PARAMS: Tuple[Param, ...] = (
    Param("timeout", "SECONDS", "how long to wait for a node's answer (default: the "
          "configuration's timeout, 60 s)"),
    Param("output-header", "yes|no", "print the header line of a table (default yes)"),
    Param("output-col", "COL,COL", "print only these columns of a table, in this order"),
    Param("output-format", "table|json", "print tables as text (default) or as JSON"),
)
COMMON_KEYS = frozenset(p.key for p in COMMON_PARAMS)

# A handler's return value, when it is a number, is the command's exit status.
Handler = Callable[["Invocation"], Optional[int]]


@dataclass
class CommandSpec:
    name: str
    summary: str
    handler: Handler
    args: Tuple[Arg, ...] = ()
    params: Tuple[Param, ...] = ()
    description: str = ""
    example: str = ""

    @property
    def usage(self) -> str:
        pieces = [a.usage for a in self.args] + [p.usage for p in self.params]
        return " ".join(pieces)

    @property
    def keys(self) -> Dict[str, str]:
        """Every ``key=`` this command accepts, with what it is."""
        keys = {p.key: "parameter" for p in self.params}
        keys.update({a.keyword: "argument" for a in self.args if a.keyword})
        keys.update({k: "common" for k in COMMON_KEYS})
        return keys


COMMANDS: Dict[str, CommandSpec] = {}


def command(name: str, summary: str, *, args: Sequence[Arg] = (), params: Sequence[Param] = (),
            description: str = "", example: str = "") -> Callable[[Handler], Handler]:
    """Declare a ``rocks`` command (``name`` is its words, e.g. "add host vm")."""
    def register(handler: Handler) -> Handler:
        if name in COMMANDS:
            raise RuntimeError(f"command {name!r} declared twice")
        many = [a for a in args if a.many]
        if len(many) > 1 or (many and args[-1] is not many[0]):
            raise RuntimeError(f"{name}: only the last argument may take several values")
        COMMANDS[name] = CommandSpec(name=name, summary=summary, handler=handler,
                                     args=tuple(args), params=tuple(params),
                                     description=description.strip(), example=example.strip())
        return handler
    return register


# ------------------------------------------------------------------ parsing
_PARAM_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)=(.*)$", re.DOTALL)


def parse_words(spec: CommandSpec, words: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Split Rocks-style words into arguments and parameters, checking their number."""
    positional: List[str] = []
    params: Dict[str, str] = {}
    allowed = spec.keys
    for word in words:
        if word.startswith("--"):
            raise CommandUsageError(f"unknown option {word!r} (options such as --debug go "
                                    f"before the command: rocks --debug {spec.name} ...)")
        m = _PARAM_RE.match(word)
        if m is None:
            positional.append(word)
            continue
        key, value = m.group(1).lower(), m.group(2)
        if key not in allowed:
            own = sorted(k for k, kind in allowed.items() if kind != "common")
            hint = f"it takes {', '.join(k + '=' for k in own)}" if own else \
                "it takes no parameters of its own"
            raise CommandUsageError(f"unknown parameter {key!r} for '{spec.name}' ({hint})")
        if key in params:
            raise CommandUsageError(f"parameter {key!r} given twice")
        params[key] = value

    values: Dict[str, Any] = {}
    pending = list(positional)
    for arg in spec.args:
        if arg.keyword and arg.keyword in params:
            values[arg.key] = params.pop(arg.keyword)
            if arg.many:
                values[arg.key] = [values[arg.key]]
            continue
        if arg.many:
            values[arg.key], pending = pending, []
            if arg.required and not values[arg.key]:
                _arity(spec, len(positional))
            continue
        if pending:
            values[arg.key] = pending.pop(0)
        elif arg.required:
            _arity(spec, len(positional))
        else:
            values[arg.key] = None
    if pending:
        _arity(spec, len(positional))
    for p in spec.params:
        if p.required and p.key not in params:
            raise CommandUsageError(f"missing parameter {p.key}={p.metavar} "
                                    f"(usage: rocks {spec.name} {spec.usage})")
    return values, params


def _arity(spec: CommandSpec, got: int) -> None:
    raise CommandUsageError(f"wrong number of arguments ({got}): usage: "
                            f"rocks {spec.name} {spec.usage}")


# --------------------------------------------------------------- invocation
@dataclass
class GlobalState:
    """What the options before the command said; kept for the error handler."""

    config_path: Optional[str] = None
    debug: bool = False


@dataclass
class Invocation:
    """One run of one command: its checked input and the resources it opened."""

    spec: CommandSpec
    state: GlobalState
    args: Dict[str, Any]
    params: Dict[str, str]
    output: OutputOptions = field(default_factory=OutputOptions)
    _config: Optional[Config] = None
    _registry: Optional["Registry"] = None
    _reader: Optional[RegistryReader] = None
    _rpc: Any = None
    _hypervisor: Any = None
    default_timeout: Optional[float] = None    # a command's own, below the configuration's

    @classmethod
    def parse(cls, spec: CommandSpec, state: GlobalState, words: Sequence[str]) -> "Invocation":
        args, params = parse_words(spec, words)
        inv = cls(spec=spec, state=state, args=args, params=params)
        inv.output = OutputOptions.from_params(params)
        if "timeout" in params:
            parse_timeout(params["timeout"])  # a bad value fails before anything is done
        return inv

    # -- input -------------------------------------------------------------
    def param(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.params.get(key, default)

    @property
    def timeout(self) -> float:
        text = self.params.get("timeout")
        if text is not None:
            return parse_timeout(text)
        return self.config.timeout if self.default_timeout is None else self.default_timeout

    # -- resources ---------------------------------------------------------
    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = config_mod.load(self.state.config_path)
        return self._config

    @property
    def registry(self) -> "Registry":
        if self._registry is None:
            from .registry import Registry
            self.config.require("frontend_db")
            self._registry = Registry(self.config.frontend_db)
        return self._registry

    @property
    def lookup(self) -> HostQueries:
        """The registry for questions only: the registry itself once this command opened
        it, else a read-only reader (lookup.py), else (no registry file yet) the registry."""
        if self._registry is not None:
            return self._registry
        if self._reader is None:
            self.config.require("frontend_db")
            self._reader = RegistryReader.open(self.config.frontend_db)
            if self._reader is None:
                return self.registry
        return self._reader

    def host(self, name: str) -> "Host":
        return self.registry.get_host(name)

    def nas(self, name: str) -> "Host":
        return self.registry.get_nas(name)

    def known_host(self, name: str) -> str:
        """The name of a registered host (``unknown host X`` otherwise)."""
        return self.lookup.get_host(name).name

    def known_nas(self, name: str) -> str:
        """The name of a registered NAS (an error naming what it is otherwise)."""
        return self.lookup.get_nas(name).name

    def request(self, node: str, message: Mapping[str, Any]) -> Dict[str, Any]:
        """Send one request to a node's daemon and return its successful reply."""
        if self._rpc is None:
            self._rpc = RpcClient(self.config)
            self._rpc.__enter__()
        try:
            return self._rpc.request(node, dict(message), self.timeout)
        except NoSuchNode as exc:
            raise MessagingError(f"{exc} (no img-storage daemon is listening as {node}: "
                                 f"is it running?)") from None

    def hypervisor(self):
        if self._hypervisor is None:
            self._hypervisor = hypervisor(self.config)
        return self._hypervisor

    # -- output ------------------------------------------------------------
    def echo(self, text: str = "") -> None:
        click.echo(text)
        sys.stdout.flush()

    def table(self, table: Table) -> None:
        text = table.render(self.output)
        if text:
            click.echo(text)

    def finish(self, ok: bool) -> None:
        """Commit the registry when the command succeeded; always release everything."""
        try:
            if self._registry is not None:
                if ok:
                    self._registry.commit()
                else:
                    self._registry.rollback()
        finally:
            if self._registry is not None:
                self._registry.close()
                self._registry = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._rpc is not None:
                rpc, self._rpc = self._rpc, None
                rpc.__exit__(None, None, None)


# ------------------------------------------------------------ value checks
def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(f"invalid timeout {text!r}: expected a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ValidationError(f"invalid timeout {text!r}: must be a positive number of seconds")
    return value


def size_param(inv: Invocation, key: str, default: int) -> int:
    text = inv.param(key)
    return default if text is None else naming.size_gb(text)


def int_param(inv: Invocation, key: str, default: Optional[int], minimum: int = 0) -> Optional[int]:
    text = inv.param(key)
    if text is None:
        return default
    return naming.non_negative_int(key, text, allow_none=False, minimum=minimum)


def bool_param(inv: Invocation, key: str, default: Optional[bool] = None) -> Optional[bool]:
    text = inv.param(key)
    if text is None:
        return default
    return naming.parse_bool(text, f"{key} value")


def none_or(text: Optional[str]) -> Optional[str]:
    """``none`` (any case) means "no value", as in the original commands."""
    if text is None or text.strip().lower() in ("none", "null"):
        return None
    return text
