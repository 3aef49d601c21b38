"""`python -m pipelines.chat_register`, as dvc.yaml runs it."""

import sys

from pipelines.chat_register.stage import main

sys.exit(main())
