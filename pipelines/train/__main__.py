"""`python -m pipelines.train`, as dvc.yaml runs it."""

import sys

from pipelines.train.stage import main

sys.exit(main())
