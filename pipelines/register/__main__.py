"""`python -m pipelines.register`, as dvc.yaml runs it."""

import sys

from pipelines.register.stage import main

sys.exit(main())
