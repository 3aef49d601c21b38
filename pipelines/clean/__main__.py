"""`python -m pipelines.clean`, as dvc.yaml runs it."""

import sys

from pipelines.clean.stage import main

sys.exit(main())
