"""A reward function that hangs the first time it is called (a stuck reward actor), then scores normally."""
from __future__ import annotations

import os
import time


def hang_once(prompt: str, response: str, marker: str) -> float:
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(3600)
    return response.count("e") / max(len(response), 1)
