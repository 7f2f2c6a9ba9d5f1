"""The subcommands, one module per concern, each imported only when its command runs.

`fsmount snapshot` or `status` is a request over a socket: importing the engine, boto3 and the
progress bars for it took longer than the snapshot of a small change (0.3 s of a 0.7 s call).
`--help` imports them all, to list them.
"""

from __future__ import annotations

import importlib

import click

# command name -> the module of fsmount.commands whose COMMANDS holds it
COMMAND_MODULES = {
    "init": "repository_cmds", "snapshots": "repository_cmds", "ls": "repository_cmds",
    "backup": "backup_cmd", "restore": "restore_cmd", "verify": "verify_cmd",
    "replicas": "replicas_cmd", "migrate": "migrate_cmd", "mount-snapshots": "browse_cmd",
    "unlock": "unlock_cmd", "mount": "live_cmds", "snapshot": "live_cmds", "status": "live_cmds", "umount": "live_cmds",
}


class LazyGroup(click.Group):
    """A group whose commands are looked up in `COMMAND_MODULES` when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in COMMAND_MODULES:
            return super().get_command(ctx, name)
        module = importlib.import_module(f"{__name__}.{COMMAND_MODULES[name]}")
        command = next(c for c in module.COMMANDS if c.name == name)
        _accept_output_options(command)
        self.add_command(command)
        return command


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        from ..cli import set_verbosity

        ctx.find_root().obj.quiet = True
        set_verbosity(0)  # -q wins over -v, whichever comes first


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value and not ctx.find_root().obj.quiet:
        from ..cli import set_verbosity

        set_verbosity(value)


def _accept_output_options(command: click.Command) -> None:
    """`-q` and `-v` after the command too (`fsmount backup -q DIR`), as `--json` already was."""
    for sub in getattr(command, "commands", {}).values():
        _accept_output_options(sub)
    taken = {opt for param in command.params for opt in getattr(param, "opts", ())}
    if "-q" not in taken:
        command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                           callback=_set_quiet, help="Print only errors and warnings."))
    if "-v" not in taken:
        command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                           callback=_set_verbose, help="More log output (repeat for debug)."))
