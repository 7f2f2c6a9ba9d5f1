"""The subcommands, one module per concern; `register` adds them all to the `fsmount` group."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from . import backup_cmd, browse_cmd, live_cmds, migrate_cmd, replicas_cmd, repository_cmds, restore_cmd, verify_cmd

    for module in (repository_cmds, backup_cmd, restore_cmd, verify_cmd, replicas_cmd, migrate_cmd, browse_cmd, live_cmds):
        for command in module.COMMANDS:
            group.add_command(command)
