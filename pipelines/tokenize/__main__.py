"""`python -m pipelines.tokenize`, as dvc.yaml runs it."""

import sys

from pipelines.tokenize.stage import main

sys.exit(main())
