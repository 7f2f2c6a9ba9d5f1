"""The `fsmount` command: global options, the subcommands, and the one place errors become exits.

Exit codes (restic's where restic has one):

    0   success                       10  no repository at the location
    1   other error                   11  repository is locked
    2   bad usage or arguments        12  wrong passphrase
    3   finished, with warnings       13  repository format too new
        (files skipped or failed)     14  missing or corrupt repository data
  130   interrupted (Ctrl-C)          15  storage failed (unreachable, full, denied)
  143   terminated (SIGTERM)
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from backend.errors import FsmountError

from . import background
from .commands import LazyGroup
from .context import AppContext
from .output import say, say_styled

EXIT_WARNINGS = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process it ended


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error", "DEBUG": "debug"}.get(record.levelname, "info")
        say_styled(f"{level}:", record.getMessage(), bold=True)
        if record.exc_info:  # only `log.exception`, for what should not happen: the log needs the trace
            say(logging.Formatter().formatException(record.exc_info), err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-r", "--repo", "repos", multiple=True, metavar="LOCATION", envvar=None,
              help="Repository location: a directory, local:DIR, s3:BUCKET/PREFIX, "
                   "s3:https://HOST/BUCKET/PREFIX, or profile:NAME (a location with its own credentials "
                   "from ~/.config/fsmount/profiles.toml). Repeat for replicas. Default: $FSMOUNT_REPOSITORY.")
@click.option("--profile", "profiles", multiple=True, metavar="NAME",
              help="Same as -r profile:NAME.")
@click.option("--password-file", metavar="FILE",
              help="Read the passphrase from FILE. Default: $FSMOUNT_PASSWORD_FILE, $FSMOUNT_PASSWORD, "
                   "or a prompt.")
@click.option("--cache-dir", metavar="DIR", help="Local cache (index). Default: $XDG_CACHE_HOME/fsmount.")
@click.option("--degraded", is_flag=True,
              help="With replicas: go on when one fails, record what it missed, heal later with "
                   "`fsmount replicas sync`.")
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and warnings.")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.version_option(package_name="fsmount")
@click.pass_context
def main(ctx: click.Context, repos: tuple[str, ...], profiles: tuple[str, ...], password_file: str | None, cache_dir: str | None,
         degraded: bool, json_output: bool, quiet: bool, verbose: int) -> None:
    """Continuous, encrypted, incremental backup of your folders.

    \b
    Start:
      export FSMOUNT_REPOSITORY=~/backups/repo FSMOUNT_PASSWORD_FILE=~/.fsmount-pass
      fsmount init
      fsmount backup ~/projects
      fsmount snapshots
      fsmount restore latest --target ~/restored

    Every command accepts --help.
    """
    logging.basicConfig(level=logging.WARNING, handlers=[_StderrHandler()], force=True)
    set_verbosity(0 if quiet else verbose)  # -q wins over -v
    locations = [*repos, *(f"profile:{name}" for name in profiles)]
    ctx.obj = AppContext(locations, password_file, cache_dir, json_output, quiet, degraded)
    ctx.call_on_close(ctx.obj.record_degraded_writes)


def set_verbosity(verbose: int) -> None:
    """-v: what the engine does (info); -vv: each file too (debug); -vvv: botocore's requests."""
    logging.getLogger().setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 3 else logging.DEBUG)


class _Terminated(Exception):
    """SIGTERM: stop as Ctrl-C does (the daemons handle it themselves, to unmount)."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated


def run() -> None:
    """Console-script entry point: run the CLI and turn our errors into messages and exit codes."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main.main(standalone_mode=False, prog_name="fsmount")
    except FsmountError as exc:
        background.report_failure(str(exc), exc.exit_code)
        say_styled("fsmount:", str(exc), bold=True, fg="red")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        say("fsmount: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        say("fsmount: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except _Terminated:
        say("fsmount: terminated (SIGTERM)", err=True)
        sys.exit(EXIT_TERMINATED)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `fsmount` alone: the help
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        where = exc.ctx.command_path if exc.ctx is not None else "fsmount"
        say(f"fsmount: {exc.format_message().rstrip('.')} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(code or 0)
