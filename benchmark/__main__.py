"""`python -m benchmark`: dispatch only; each subcommand lives in benchmark.app.cli."""

import sys

from benchmark.app.cli import main

sys.exit(main())
