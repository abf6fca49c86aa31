"""The ``ddpmkit`` command's entry point: Ctrl-C while torch loads ends quietly, like later.

``import ddpmkit`` is light (its public names load on first use), so this module runs within
milliseconds of start-up. It then loads numpy and torch with SIGINT *deferred*: an interrupt
raised inside a C extension's initialisation does not stay a KeyboardInterrupt (numpy turns it
into an ImportError), so it is recorded instead, and acted on once the imports are done.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        import numpy  # noqa: F401  the slow imports (1-2 s), with Ctrl-C held back
        import torch  # noqa: F401

        from .cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return cli_main(argv)
    except KeyboardInterrupt:  # the CLI catches it once running; this covers its first lines
        print("interrupted", file=sys.stderr)
        return 130
