"""`python -m pipelines.chat_eval`, as dvc.yaml runs it."""

import sys

from pipelines.chat_eval.stage import main

sys.exit(main())
