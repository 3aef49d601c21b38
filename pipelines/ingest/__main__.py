"""`python -m pipelines.ingest`, as dvc.yaml runs it."""

import sys

from pipelines.ingest.stage import main

sys.exit(main())
