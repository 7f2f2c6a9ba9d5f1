"""The `fsmount` command: global options, the subcommands, and the one place errors become exits.

Exit codes are `EXIT_CODES` below (restic's where restic has one): `fsmount --help` shows them and
README.md keeps a copy that tests/test_exit_codes.py holds to them. On failure, `--json` puts
`{"error": message, "exit_code": code}` on stdout, unless the command printed its own document
(which then says `error` itself); the one-line message goes to stderr either way.
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
from .output import emit_json, json_emitted, one_line, say, say_styled

EXIT_WARNINGS = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process it ended

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "other error"),
    (2, "bad usage or arguments"),
    (EXIT_WARNINGS, "finished with warnings (files skipped or not restored, a replica left behind by --degraded)"),
    (10, "no repository at the location"),
    (11, "repository is locked"),
    (12, "wrong passphrase"),
    (13, "repository format too new"),
    (14, "missing or corrupt repository data"),
    (15, "storage failed (unreachable, full, denied)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_TERMINATED, "terminated (SIGTERM)"),
)
"""Every exit code and what it means: the help's epilog and README.md's list are made from this."""


def exit_codes_help() -> str:
    """The exit codes as `fsmount --help` ends with them."""
    return "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)


def exit_codes_sentence() -> str:
    """The exit codes as README.md lists them, in one sentence."""
    return "Exit codes: " + ", ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES) + "."


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error", "DEBUG": "debug"}.get(record.levelname, "info")
        say_styled(f"{level}:", record.getMessage(), bold=True)
        if record.exc_info:  # only `log.exception`, for what should not happen: the log needs the trace
            say(logging.Formatter().formatException(record.exc_info), err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=exit_codes_help())
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
@click.option("--no-lock", is_flag=True,
              help="Take no repository lock: for read-only commands on a repository this process "
                   "may not write (see `fsmount unlock --help`).")
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and warnings.")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.version_option(package_name="fsmount")
@click.pass_context
def main(ctx: click.Context, repos: tuple[str, ...], profiles: tuple[str, ...], password_file: str | None, cache_dir: str | None,
         degraded: bool, no_lock: bool, json_output: bool, quiet: bool, verbose: int) -> None:
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
    app = ctx.ensure_object(AppContext)  # the one `run` made, which it reads once the command is over
    app.repo_locations = [*repos, *(f"profile:{name}" for name in profiles)]
    app.password_file, app.cache_dir, app.degraded = password_file, cache_dir, degraded
    app.json, app.quiet, app.no_lock = json_output, quiet, no_lock
    ctx.call_on_close(app.record_degraded_writes)


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
    app = AppContext()
    try:
        _run(app)
    finally:  # normal exit, errors, Ctrl-C and SIGTERM alike: the lock is removed
        app.release_lock()


def _run(app: AppContext) -> None:
    try:
        code = main.main(standalone_mode=False, prog_name="fsmount", obj=app)
    except FsmountError as exc:
        message = one_line(str(exc))
        background.report_failure(message, exc.exit_code)
        say_styled("fsmount:", message, bold=True, fg="red")
        _exit_failed(app, message, exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        say("fsmount: interrupted", err=True)
        _exit_failed(app, "interrupted", EXIT_INTERRUPTED)
    except _Terminated:
        say("fsmount: terminated (SIGTERM)", err=True)
        _exit_failed(app, "terminated (SIGTERM)", EXIT_TERMINATED)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `fsmount` alone: the help
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        where = exc.ctx.command_path if exc.ctx is not None else "fsmount"
        message = one_line(f"{exc.format_message().rstrip('.')} (see `{where} --help`)")
        say(f"fsmount: {message}", err=True)
        _exit_failed(app, message, exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        _exit_failed(app, exc.format_message(), exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(_with_degraded_writes(app, code or 0))


def _with_degraded_writes(app: AppContext, code: int) -> int:
    """A run that left a replica behind (--degraded) finished with a warning, whatever it did."""
    missed = app.missed_by_replicas()
    for line in missed:
        say_styled("warning:", f"replica {line['replica']} missed {line['objects']} objects of this run "
                   "(--degraded): run `fsmount replicas sync`", bold=True)
    return code or (EXIT_WARNINGS if missed else 0)


def _exit_failed(app: AppContext, message: str, code: int) -> None:
    """Exit with `code`; with --json, a script gets the error on stdout too, as one JSON object,
    unless the command printed its document already (a second one would make stdout no JSON)."""
    if (app.json or _asks_for_json(sys.argv[1:])) and not json_emitted():
        try:
            emit_json({"error": message, "exit_code": code})
        except BrokenPipeError:
            pass
    sys.exit(code)


def _asks_for_json(args: list[str]) -> bool:
    """Whether --json is among the options, for errors raised before its callback ran (a bad
    argument parsed before it)."""
    return "--json" in args[:args.index("--")] if "--" in args else "--json" in args
