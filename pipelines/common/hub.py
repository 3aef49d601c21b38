"""Whether the Hugging Face hub answers, asked once up front: the hub client retries for minutes before it gives up,
and a source that needs the hub must fail at once, in one line, when it is out of reach."""

from __future__ import annotations

import os
import urllib.error
import urllib.request


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None if the hub answers (or the user asked for the local cache only: HF_HUB_OFFLINE=1), else why not."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None  # the user asked for the local cache only
    from huggingface_hub import constants  # lazily: only hf sources need the hub client

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None
