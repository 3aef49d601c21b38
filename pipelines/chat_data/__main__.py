"""`python -m pipelines.chat_data`, as dvc.yaml runs it."""

import sys

from pipelines.chat_data.stage import main

sys.exit(main())
