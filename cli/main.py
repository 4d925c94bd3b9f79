"""The ``mlx-i2v`` command. Only the CLI prints; the library logs."""

from __future__ import annotations

import logging
import sys

import click

from mlx_i2v import __version__
from mlx_i2v.errors import MlxI2VError

from .bench import bench
from .convert import convert, info, quantize
from .creative import extend, restyle
from .generate import generate
from .signals import Terminated, terminate_cleanly


class _Group(click.Group):
    """Turns every user-facing error (bad arguments included) into one line on stderr and a non-zero
    exit code, never a traceback or a usage dump. SIGTERM and SIGHUP end it like Ctrl-C: what was being
    written is removed, and the exit code is 128 + the signal number."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with terminate_cleanly():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            _fail(e.format_message(), code=2)
        except click.ClickException as e:
            _fail(e.format_message(), code=e.exit_code)
        except MlxI2VError as e:
            _fail(str(e), code=1)
        except (KeyboardInterrupt, click.Abort):
            _fail("interrupted", code=130)
        except Terminated as e:
            _fail(f"terminated by {e}", code=128 + e.signum)
        except MemoryError:
            _fail("out of memory: try a smaller --height/--width or fewer --frames", code=1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int) -> None:
    from mlx_i2v.parallel import joined_rank

    rank = joined_rank()  # in a parallel run every rank may print an error: say which one
    if rank is not None and not message.startswith("rank "):
        message = f"rank {rank}: {message}"
    try:
        click.echo(f"error: {message}", err=True)
    except OSError:  # the terminal is gone (SIGHUP)
        pass
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-i2v")
@click.option("-v", "--verbose", is_flag=True, help="Show the library's log messages.")
def main(verbose: bool) -> None:
    """Turn a photo into a short video with the Wan models, in MLX."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


main.add_command(generate)
main.add_command(restyle)
main.add_command(extend)
main.add_command(bench)
main.add_command(convert)
main.add_command(quantize)
main.add_command(info)

if __name__ == "__main__":  # pragma: no cover
    main()
