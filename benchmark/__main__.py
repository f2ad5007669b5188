"""`python -m benchmark`: dispatch only; each subcommand lives in benchmark.app.cli."""

import sys

try:
    # Importing torch and friends takes seconds; Ctrl-C then is an interrupt, not a traceback.
    from benchmark.app.cli import main
except KeyboardInterrupt:
    print("interrupted while starting; nothing was run", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
