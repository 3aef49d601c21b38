"""`python -m pipelines.finetune`, as dvc.yaml runs it."""

import sys

from pipelines.finetune.stage import main

sys.exit(main())
