"""The `hedwigpy` command line (INTERFACE.md, CLI)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .cli_dkim import add_dkim_commands
from .cli_events import add_events_command
from .cli_queue import add_queue_commands, add_send_command


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import app
    from .config import ConfigError, load_config
    from .config_check import check_files
    from .logging import configure

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"{args.config}: {err}", file=sys.stderr)
        return 1
    problems = check_files(config)
    for err in problems:
        print(f"{args.config}: {err}", file=sys.stderr)
    if problems:
        return 1
    configure(config.log.level, config.log.format)
    trio.run(app.run, config)
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .config_check import check_files

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"{args.config}: {err}", file=sys.stderr)
        return 1
    problems = check_files(config)
    for err in problems:
        print(f"{args.config}: {err}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.config}: ok")
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from .auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hedwigpy", description="An embedded mail transfer agent.")
    parser.add_argument("--version", action="version", version=f"hedwigpy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    default_config = os.environ.get("HEDWIG_CONFIG", "hedwig.toml")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("-c", "--config", default=default_config)
    serve.set_defaults(func=_cmd_serve)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", default=default_config)
    check.set_defaults(func=_cmd_config_check)

    passwd = sub.add_parser("passwd", help="hash a password for [[users]] or [[api_keys]]")
    passwd.set_defaults(func=_cmd_passwd)
    add_queue_commands(sub)
    add_send_command(sub)
    add_events_command(sub)
    add_dkim_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
