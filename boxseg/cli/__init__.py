"""The commands: one click command per file; options -> config -> one library call.

Every command takes -h as well as --help, and --version."""

import click

from boxseg import __version__

HELP = {"help_option_names": ["-h", "--help"]}


def version(prog: str):
    return click.version_option(__version__, "--version", prog_name=prog, message="%(prog)s (boxseg) %(version)s")
