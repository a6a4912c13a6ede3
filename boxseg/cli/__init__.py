"""The commands: one click command per file; options -> config -> one library call.

Every command takes -h as well as --help, and --version."""

import contextlib
import sys

import click

from boxseg import __version__

HELP = {"help_option_names": ["-h", "--help"]}


def threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads of the main process (default: the CPUs this process may use, by affinity "
                             "and cgroup quota; boxseg-train: less one per DataLoader worker).")(f)


def version(prog: str):
    return click.version_option(__version__, "--version", prog_name=prog, message="%(prog)s (boxseg) %(version)s")


class Exit:
    """Exit statuses of every command, one per kind of failure (README, "Exit statuses")."""
    OK = 0
    PROBLEMS_FOUND = 1      # boxseg-data check: the data has problems (each listed with its file)
    USAGE = 2               # a wrong option or argument (click's own status)
    BAD_INPUT = 3           # a bad file or folder: the message names it and the problem
    DIVERGED = 4            # training: the loss became NaN or infinite
    NON_FINITE = 5          # inference: NaN or infinite network outputs (fp16 overflow?); nothing written or scored
    MISSING_PACKAGE = 6     # an optional package or program (tensorrt, chromium) is missing
    PARITY_FAILED = 7       # boxseg-export: an artifact disagrees with PyTorch (written, but not to be trusted)
    EXPORT_FAILED = 8       # boxseg-export: the AOTInductor compile failed or crashed (phase named)
    PAGE_CHECK_FAILED = 9   # boxseg-report --screenshot: console errors or broken images in the page
    NO_SPACE = 10           # the disk filled up (the file named); what was written is whole, a rerun resumes


def stop_on_sigterm() -> None:
    """SIGTERM ends a command as Ctrl-C does: cleanup runs (workers stopped, nothing half
    written), and the same command resumes."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


def no_space(e: OSError) -> None:
    """Report a full disk and exit (Exit.NO_SPACE)."""
    click.echo(f"error: {e.strerror}; what was written is whole, and the same command resumes once there is room",
               err=True)
    sys.exit(Exit.NO_SPACE)


def fail(e: BaseException, status: int) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(status)


@contextlib.contextmanager
def exit_on_errors():
    """The failures every command reports the same way: one line naming the file or the
    package, and its exit status (bad input 3, a missing or misinstalled optional package 6,
    a failed AOTInductor build 8, a full disk 10)."""
    from boxseg.errors import DataError, NoSpace
    from boxseg.export.aoti import AotiExportError
    from boxseg.predict.image import TorchvisionMissing
    from boxseg.predict.onnxruntime import OnnxRuntimeMissing, ProviderFallback
    from boxseg.predict.tensorrt import TensorRTMissing

    try:
        yield
    except DataError as e:
        fail(e, Exit.BAD_INPUT)
    except (OnnxRuntimeMissing, ProviderFallback, TensorRTMissing, TorchvisionMissing) as e:
        fail(e, Exit.MISSING_PACKAGE)
    except AotiExportError as e:
        fail(e, Exit.EXPORT_FAILED)
    except NoSpace as e:
        no_space(e)


def check_backend(backend: str | None, precision: str, device=None) -> None:
    """Exported artifacts are fp32 or fp16: bf16 runs with the torch backends. cudagraph
    needs a CUDA device."""
    if backend in ("onnxruntime", "aoti", "tensorrt") and precision == "bf16":
        raise click.BadParameter(f"backend {backend} runs fp32 or fp16 artifacts, not bf16 (bf16: torch, cudagraph "
                                 f"or compile)", param_hint="--precision")
    if backend == "cudagraph" and device is not None and device.type != "cuda":
        raise click.BadParameter(f"backend cudagraph replays CUDA graphs and needs a CUDA device, not {device} "
                                 f"(torch or compile run there)", param_hint="--backend")
