"""`python -m pipelines.serve`: see pipelines/serve/cli.py."""

import sys

from pipelines.serve.cli import main

sys.exit(main())
