import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports load: no traceback, as later
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
