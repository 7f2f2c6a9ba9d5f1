"""`python -m fsmount` is the `fsmount` command."""

from .cli import run

run()
