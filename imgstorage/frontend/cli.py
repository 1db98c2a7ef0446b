"""The ``rocks`` / ``imgstorage`` command line.

Operators type Rocks commands: verbs and nouns as words (``add host vm``),
then positional arguments, then ``key=value`` parameters.  Click provides the
help and the option parsing; the group below resolves multi-word command
names by their longest match so that ``add host vm`` and ``add host`` can
both exist.  Every failure is one line ``error - <message>`` on stderr and a
non-zero status, never a traceback, because these commands run in scripts
and from Rocks-style wrappers that only look at the exit status and the
last line.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import click

from ..errors import ConfigError, ImgStorageError
from .commands_base import (COMMANDS, COMMON_PARAMS, CommandSpec, CommandUsageError,
                            GlobalState, Invocation)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Which module declares each command.  A command line imports only the module
# of the command it runs (a listing needs neither the registry's mapped classes
# nor the VM commands, which the host commands import too); the help and a
# mistyped command import them all.  A unit test keeps this in step with the
# declarations, and a command missing here is still found, after all are
# imported.
COMMAND_MODULES: Dict[str, Tuple[str, ...]] = {
    "commands_storage": (
        "add host storagemap", "remove host storagemap", "remove host storageimg",
        "list host storagemap", "list host storagedev", "set host zvolattr",
        "list host zvolattr", "set host storageattr", "remove host storageattr",
        "list host storageattr", "clean host storagemap"),
    "commands_vm": (
        "add host vm", "remove host vm", "list host vm", "set host vm nas", "list host vm nas",
        "dump host vm nas", "remove host vm nas", "start host vm", "stop host vm"),
    "commands_hosts": (
        "add host", "remove host", "list host", "set host attr", "add host attr",
        "remove host attr", "list host attr", "add appliance attr", "set appliance attr",
        "remove appliance attr", "list appliance attr", "set attr", "add attr", "remove attr",
        "list attr"),
    "commands_broker": ("sync host imgstorage", "report host imgstorage"),
}
_MODULE_OF = {name: module for module, names in COMMAND_MODULES.items() for name in names}


def declare(module: str) -> None:
    """Import a command module (its commands declare themselves in COMMANDS)."""
    importlib.import_module(f"{__package__}.{module}")


def declare_all() -> None:
    for module in COMMAND_MODULES:
        declare(module)


class RocksCommand(click.Command):
    """One declared command; all its words are parsed by ``Invocation.parse``."""

    def __init__(self, spec: CommandSpec):
        self.spec = spec
        super().__init__(
            name=spec.name, callback=self._run, short_help=spec.summary, help=spec.summary,
            params=[click.Argument(["words"], nargs=-1, type=click.UNPROCESSED)],
            context_settings={"ignore_unknown_options": True,
                              "help_option_names": ["--help", "-h"]})

    def _run(self, words: Tuple[str, ...]) -> Optional[int]:
        state = click.get_current_context().find_object(GlobalState) or GlobalState()
        inv = Invocation.parse(self.spec, state, words)
        ok = False
        try:
            status = self.spec.handler(inv)
            ok = True
        finally:
            inv.finish(ok)
        return status if isinstance(status, int) and not isinstance(status, bool) else None

    def collect_usage_pieces(self, ctx: click.Context) -> List[str]:
        return [self.spec.usage] if self.spec.usage else []

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        spec = self.spec
        formatter.write_usage(ctx.command_path, spec.usage)
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(spec.summary)
            if spec.description:
                formatter.write_paragraph()
                formatter.write_text(spec.description)
        if spec.args:
            with formatter.section("Arguments"):
                formatter.write_dl([(a.usage + (f"  (or {a.keyword}=...)" if a.keyword else ""),
                                     a.help) for a in spec.args])
        if spec.params:
            with formatter.section("Parameters"):
                formatter.write_dl([(f"{p.key}={p.metavar}",
                                     p.help + (" (required)" if p.required else ""))
                                    for p in spec.params])
        with formatter.section("Common parameters"):
            formatter.write_dl([(f"{p.key}={p.metavar}", p.help) for p in COMMON_PARAMS])
        if spec.example:
            with formatter.section("Example"):
                for line in spec.example.splitlines():
                    formatter.write(" " * formatter.current_indent + line.rstrip() + "\n")


class RocksGroup(click.Group):
    """Resolves ``verb noun...`` by the longest declared name and reports errors in one line.

    Commands are added as their modules are imported: the one a command line
    names, or all of them for the help and for an unknown command.
    """

    def _known(self) -> Set[str]:
        return set(_MODULE_OF) | set(COMMANDS)

    def _add_declared(self) -> None:
        for name, spec in COMMANDS.items():
            if name not in self.commands:
                self.add_command(RocksCommand(spec), name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        if cmd_name not in self.commands and cmd_name in _MODULE_OF:
            declare(_MODULE_OF[cmd_name])
            self._add_declared()
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> List[str]:
        declare_all()
        self._add_declared()
        return sorted(self.commands)

    def resolve_command(self, ctx: click.Context, args: List[str]):
        words: List[str] = []
        for arg in args:
            if arg.startswith("-") or "=" in arg:
                break
            words.append(arg)
        for attempt in (1, 2):
            longest = max((len(name.split()) for name in self._known()), default=1)
            for n in range(min(len(words), longest), 0, -1):
                name = " ".join(words[:n])
                cmd = self.get_command(ctx, name)
                if cmd is not None:
                    return name, cmd, list(args[n:])
            self.list_commands(ctx)       # a command COMMAND_MODULES does not name yet
        self._no_such_command(ctx, words, args)

    def _no_such_command(self, ctx: click.Context, words: List[str], args: List[str]) -> None:
        self.list_commands(ctx)
        prefix: List[str] = []
        for word in words:
            if not any(name.split()[:len(prefix) + 1] == prefix + [word] for name in self.commands):
                break
            prefix.append(word)
        if not prefix:
            shown = words[0] if words else (args[0] if args else "")
            raise click.UsageError(f"unknown command '{shown}' ('{ctx.info_name} --help' lists "
                                   f"the commands)", ctx)
        matches = sorted(n for n in self.commands if n.split()[:len(prefix)] == prefix)
        if any(a in ("--help", "-h") for a in args):
            formatter = ctx.make_formatter()
            with formatter.section(f"Commands beginning with '{' '.join(prefix)}'"):
                formatter.write_dl([(n, self.commands[n].get_short_help_str(80)) for n in matches])
            click.echo(formatter.getvalue().rstrip("\n"))
            ctx.exit(EXIT_OK)
        given = " ".join(words) if words else " ".join(prefix)
        raise click.UsageError(f"unknown command '{given}': did you mean "
                               + ", ".join(f"'{n}'" for n in matches[:8])
                               + (", ..." if len(matches) > 8 else ""), ctx)

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        state = extra.pop("obj", None) or GlobalState()
        code = _run_guarded(self, args, prog_name or _prog_name(), complete_var, state, extra)
        if standalone_mode:
            sys.exit(code)
        return code


def _prog_name() -> str:
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "imgstorage" if base == "imgstorage" else "rocks"


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    click.echo(f"error - {text}", err=True)


def _run_guarded(group: click.Group, args: Optional[Sequence[str]], prog_name: str,
                 complete_var: Optional[str], state: GlobalState, extra: dict) -> int:
    """Run the command; map every failure to one line and an exit status."""
    try:
        rv = click.Group.main(group, args=list(args) if args is not None else None,
                              prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, obj=state, **extra)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK
    except (ConfigError, CommandUsageError) as exc:
        _debug_trace(state)
        _error(str(exc))
        return EXIT_USAGE
    except ImgStorageError as exc:
        _debug_trace(state)
        _error(str(exc))
        return EXIT_ERROR
    except click.UsageError as exc:
        _error(exc.format_message())
        return EXIT_USAGE
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader of our output went away (| head)
            _silence_stdout()
            return EXIT_ERROR
        _debug_trace(state)
        _error(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except Exception as exc:  # a bug: say so in one line, and show it all with --debug
        _debug_trace(state)
        _error(f"internal error: {type(exc).__name__}: {exc}"
               + ("" if state.debug else " (run with --debug for details)"))
        return EXIT_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output)
        pass


def _debug_trace(state: GlobalState) -> None:
    if state.debug:
        traceback.print_exc(file=sys.stderr)


HELP = """Manage VM disks kept as ZFS volumes on NAS servers.

\b
Commands are Rocks commands: verbs and nouns as words, then arguments, then
key=value parameters, e.g.
  rocks add host vm vm-container-0-14 compute disksize=40
  rocks set host vm nas compute-0-14-0 nas=nas-0-0 zpool=tank
  rocks list host storagemap nas-0-0 output-format=json

Every command also takes timeout=SECONDS, output-header=no, output-col=A,B and
output-format=table|json.  'rocks COMMAND --help' explains one command.

Every host named on the command line must be registered ('rocks add host');
a NAS must be of appliance nas or have the attribute img_storage_nas=true.

Exit status: 0 on success, 1 when the command failed, 2 for a malformed
command line or configuration.
"""


@click.group(name="rocks", cls=RocksGroup, invoke_without_command=True, help=HELP,
             subcommand_metavar="VERB NOUN... [ARGS]... [key=value]...",
             context_settings={"help_option_names": ["--help", "-h"]})
@click.option("--config", "config_path", metavar="PATH",
              help="configuration file (default: $IMGSTORAGE_CONF, else /etc/imgstorage.conf)")
@click.option("--debug", is_flag=True, help="log the conversation with the nodes and show "
              "tracebacks of internal errors")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[str], debug: bool) -> None:
    state = ctx.ensure_object(GlobalState)
    state.config_path = config_path
    state.debug = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: runs one command and exits with its status."""
    cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
