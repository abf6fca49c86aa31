"""The ``ddpmkit`` command's entry point: Ctrl-C while torch loads ends quietly, like later.

``import ddpmkit`` is light (its public names load on first use), so this module runs within
milliseconds of start-up and can catch an interrupt during the heavy imports that follow.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .cli import main as cli_main
        return cli_main(argv)
    except KeyboardInterrupt:  # the CLI catches it once running; this covers the imports
        print("interrupted", file=sys.stderr)
        return 130
