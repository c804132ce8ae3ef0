"""The `seal` command line: the only place in seal that prints.

Every user-facing failure (bad input, bad config, missing model) is one line on
stderr and a non-zero exit; tracebacks are for bugs.

This module is the root group (the --home, --set, --model and -v options), the App
every command gets, and the printing helpers. The commands live by room and are
imported when first needed (``COMMANDS``): the everyday ones in ``agent.commands``,
the views in ``agent.ui.commands``, `seal daemon` in ``agent.daemon.cli`` and
`seal bench` in ``agent.bench.cli``. `seal --help`, `seal CMD --help` and shell
completion import no model library (torch, transformers, peft, trl): the
configuration, which does, is read when a command runs, and command modules import
heavy things inside their functions.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click
from rich.console import Console

from adapters.names import EDITOR, KNOWLEDGE

from .home import Home, private_umask
from .settings import ConfigError, config_items, parse_overrides, resolve_home, to_toml

if TYPE_CHECKING:
    from store import Store

    from .app import Parts
    from .config import Config
    from .runtime import Runtime
    from .wake import Learner

log = logging.getLogger(__name__)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# name -> "module:attribute" of the commands that live in other modules
COMMANDS = {
    **{name: f"agent.commands:{name}" for name in ("ask", "ingest", "queue", "learn", "sleep", "rollback", "export",
                                                   "prune")},
    **{name: f"agent.ui.commands:{name}" for name in ("history", "show", "forgetting", "passages", "candidates",
                                                      "tui")},
    "daemon": "agent.daemon.cli:daemon",
    "bench": "agent.bench.cli:bench",
}


@dataclass
class App:
    """What every command needs, built on first use so that `--help` stays fast: the
    configuration (defaults < seal.toml < ``overrides``) and this home's parts
    (``agent.app.Parts``: store, registry, runtime, learner)."""

    home: Home
    overrides: tuple[str, ...] = ()
    _cfg: Config | None = field(default=None, repr=False)
    _parts: Parts | None = field(default=None, repr=False)
    _runtime: Runtime | None = field(default=None, repr=False)

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            from .config import load_config

            try:
                self._cfg = load_config(self.home.root, parse_overrides(self.overrides))
            except ConfigError as e:
                raise click.ClickException(str(e)) from None
        return self._cfg

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            from .app import Parts

            self._parts = Parts(self.home, self.cfg)
        return self._parts

    @property
    def store(self) -> Store:
        return self.parts.store

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            with err.status(f"loading model {self.cfg.model.path or '(default: SmolLM2-135M-Instruct)'}..."):
                self._runtime = self.parts.runtime
        return self._runtime

    @property
    def learner(self) -> Learner:
        _ = self.runtime  # the model loads first, under its status line
        return self.parts.learner

    def close(self) -> None:
        if self._parts is not None:
            self._parts.close()


pass_app = click.make_pass_decorator(App)


def fail(message: str) -> None:
    """Stop with a one-line error and exit status 1."""
    raise click.ClickException(message)


def progress_bar(console: Console, rate: bool = False):
    """seal's one progress bar: what it is doing, the bar, done/total, (a rate,) elapsed
    and ETA; gone when it finishes (rich's Progress, on ``console``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[rate]}")] if rate else []
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    redirect_stdout=False, redirect_stderr=False)


def print_table(table) -> None:
    """A rich table on a terminal; plain text without trailing padding in a pipe."""
    if out.is_terminal:
        out.print(table)
        return
    with out.capture() as cap:
        out.print(table)
    click.echo("\n".join(line.rstrip() for line in cap.get().splitlines()))


def print_view(renderable) -> None:
    """A rich renderable on a terminal; plain text (80 columns, or $COLUMNS) without
    trailing padding in a pipe. Long text wraps at the width either way."""
    if out.is_terminal:
        out.print(renderable, soft_wrap=False)
        return
    with out.capture() as cap:
        out.print(renderable, soft_wrap=False)
    click.echo("\n".join(line.rstrip() for line in cap.get().splitlines()))


def store_or_none(app: App) -> Store | None:
    """The store if the home has one: a read-only command creates nothing."""
    return app.store if app.home.store_file.exists() else None


def adapter_row(app: App, ref: str) -> dict:
    """An adapter version by id (knowledge-0003), by version (3, v3: knowledge; e2:
    editor) or 'active'; a one-line error if there is none."""
    store = store_or_none(app)
    if store is None:
        fail(f"no adapter {ref!r}: nothing learned yet in {app.home.root}")
    ref = ref.strip()
    candidates = [ref]
    low = ref.lower()
    if low == "active":
        candidates = [store.active_adapter_id(KNOWLEDGE) or ""]
    elif low.lstrip("v").isdigit():
        candidates.append(f"{KNOWLEDGE}-{int(low.lstrip('v')):04d}")
    elif low.startswith("e") and low[1:].isdigit():
        candidates.append(f"{EDITOR}-{int(low[1:]):04d}")
    for c in candidates:
        row = store.adapter(c) if c else None
        if row is not None:
            return row
    fail(f"no adapter {ref!r} (seal history lists them)")


# ----------------------------------------------------------------- groups, commands
class SealCommand(click.Command):
    """Reads the configuration before it runs: a bad seal.toml or --set stops every
    command with its one-line error (but not the command's --help)."""

    def invoke(self, ctx: click.Context):
        app = ctx.find_object(App)
        if app is not None:
            _ = app.cfg  # read now, for its error
        return super().invoke(ctx)


class SealGroup(click.Group):
    """A group whose commands may live in other modules, imported when first asked
    for (``lazy``: name -> "module:attribute"); it turns expected failures into
    one-line errors. Its commands are SealCommands, its sub-groups SealGroups."""

    command_class = SealCommand
    group_class = type

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:
            # ModelError's module imports torch: if it was never imported, none was raised
            runtime = sys.modules.get("agent.runtime")
            if runtime is not None and isinstance(e, runtime.ModelError):
                raise click.ClickException(str(e)) from None
            raise


@click.group(cls=SealGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), help="seal home folder (default: $SEAL_HOME or ~/.seal)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a setting, e.g. --set wake.candidates=5")
@click.option("--model", "model_path", help="model: local HF folder or .gguf file (same as --set model.path=...)")
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
@click.version_option(package_name="seal-daemon")
@click.pass_context
def main(ctx: click.Context, home: str | None, overrides: tuple[str, ...], model_path: str | None, verbose: int) -> None:
    """seal: a daemon that keeps a local language model learning from your documents."""
    from rich.logging import RichHandler

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's business
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    for noisy in ("transformers", "peft", "trl", "accelerate", "apscheduler", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    private_umask()  # the home, store, logs and adapters: the owner's alone
    model = (f"model.path={model_path}",) if model_path else ()
    ctx.obj = App(Home(resolve_home(home)), tuple(overrides) + model)
    ctx.call_on_close(ctx.obj.close)


# ---------------------------------------------------------------------------- config
@main.group()
def config() -> None:
    """Show or write the configuration."""


@config.command("show")
@click.option("--toml", "as_toml", is_flag=True, help="print as seal.toml text")
@pass_app
def config_show(app: App, as_toml: bool) -> None:
    """Print the resolved configuration (defaults < seal.toml < flags)."""
    if as_toml:
        click.echo(to_toml(app.cfg))
        return
    click.echo(f"# home: {app.home.root}")
    width = max(len(k) for k, _, _ in config_items(app.cfg))
    for key, value, help_ in config_items(app.cfg):
        click.echo(f"{key:<{width}} = {value!r}" + (f"   # {help_}" if help_ else ""))


@config.command("init")
@click.option("--force", is_flag=True, help="overwrite an existing seal.toml")
@pass_app
def config_init(app: App, force: bool) -> None:
    """Write <home>/seal.toml with every setting and its help."""
    path = app.home.config_file
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)")
    app.home.ensure()
    path.write_text(to_toml(app.cfg), encoding="utf-8")
    click.echo(f"wrote {path}")


def run() -> None:  # pragma: no cover - console entry for `python -m agent.cli`
    main(prog_name="seal")


if __name__ == "__main__":  # pragma: no cover
    # `python -m agent.cli` runs this file as __main__; the command modules import
    # agent.cli, so run that module's group, whose App they know.
    from agent.cli import run as run_cli

    sys.exit(run_cli())
