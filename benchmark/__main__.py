"""`python -m benchmark`: dispatch only; each subcommand lives in benchmark.cli."""

import sys

from benchmark.cli import main

sys.exit(main())
