"""`python -m pipelines.evaluate`, as dvc.yaml runs it."""

import sys

from pipelines.evaluate.stage import main

sys.exit(main())
