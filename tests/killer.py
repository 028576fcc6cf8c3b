"""A BLIP handler that kills its own process once, on a marked image: a worker dying mid-bundle.

Imported by test subprocesses (and by Beam's worker processes when they unpickle the handler).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from PIL import Image

from captionflow.handlers import BlipCaptioner, BlipCaptionHandler, register_captioner

TRIGGER_SIZE = (61, 47)
MARKER_ENV = "CAPTIONFLOW_TEST_KILL_MARKER"


@register_captioner("killer")
class KillOnceHandler(BlipCaptionHandler):
    """Records still name it `blip:<model>`, so its output compares with a plain BLIP run."""

    def predict(self, model: BlipCaptioner, batch: Sequence[Image.Image]) -> list[list[str]]:
        marker = os.environ[MARKER_ENV]
        if any(image.size == TRIGGER_SIZE for image in batch) and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(model, batch)
