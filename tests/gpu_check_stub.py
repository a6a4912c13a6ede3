"""Stand-in for python in a dry run of bench/gpu_check.sh (tests/test_gpu_check.py): each
invocation is parsed, not run, so that a renamed option, command or import fails here on CPU
instead of costing a lent GPU's minutes.

    GPU_CHECK_RECORD=LOG python tests/gpu_check_stub.py ARGS...

`-m boxseg.cli.X ARGS`: the click command (and subcommand) parses ARGS. `-m pytest ARGS`:
pytest collects them. `SCRIPT.py ARGS`: the script's `parser()` parses ARGS. `-c CODE`: CODE
compiles and each name it imports exists. Anything else fails. Each invocation is appended
to LOG as a JSON list; the exit status is 0 when it parses, else 2 with the reason."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys


def check_imports(code: str) -> None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    raise ImportError(f"{node.module} has no {alias.name}")


def check_click(module_name: str, args: list[str]) -> None:
    import click

    cmd = importlib.import_module(module_name).main
    name = module_name.rsplit(".", 1)[-1]
    if isinstance(cmd, click.Group):
        sub = cmd.get_command(click.Context(cmd), args[0]) if args else None
        if sub is None:
            raise click.UsageError(f"no command {args[:1]} in {module_name}")
        cmd, name, args = sub, args[0], args[1:]
    cmd.make_context(name, list(args))


def main(argv: list[str]) -> int:
    with open(os.environ["GPU_CHECK_RECORD"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    try:
        if argv[:1] == ["-c"]:
            check_imports(argv[1])
        elif argv[:2] == ["-m", "pytest"]:
            return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *argv[2:]]).returncode
        elif argv[:1] == ["-m"] and argv[1].startswith("boxseg.cli."):
            check_click(argv[1], argv[2:])
        elif argv and argv[0].endswith(".py"):
            spec = importlib.util.spec_from_file_location("script", argv[0])
            script = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(script)
            script.parser().parse_args(argv[1:])
        else:
            raise ValueError(f"the dry run does not know this invocation: python {' '.join(argv)}")
    except SystemExit as e:  # argparse's error
        return 2 if e.code else 0
    except Exception as e:  # every failure is the answer here
        print(f"gpu_check dry run: {type(e).__name__}: {e} (in: python {' '.join(argv)[:200]})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
