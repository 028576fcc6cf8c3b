"""Test captioners that misbehave on purpose, run inside the CLI's own process (and Beam's
worker processes, which unpickle them): one kills its process once on a marked image, one
stalls for good once enough checkpoints exist, so a test can stop the job at a known point.

Imported by test subprocesses; records still name them `blip:<model>`, so their output
compares with a plain BLIP run.
"""

from __future__ import annotations

import glob
import os
import signal
import time
from collections.abc import Sequence

from PIL import Image

from captionflow.handlers import BlipCaptioner, BlipCaptionHandler, register_captioner

TRIGGER_SIZE = (61, 47)
MARKER_ENV = "CAPTIONFLOW_TEST_KILL_MARKER"
STALL_GLOB_ENV = "CAPTIONFLOW_TEST_STALL_GLOB"  # files to count (the run's checkpoints)
STALL_AFTER_ENV = "CAPTIONFLOW_TEST_STALL_AFTER"  # stall once this many exist
STALLED_MARKER_ENV = "CAPTIONFLOW_TEST_STALLED_MARKER"  # created when the stall begins


@register_captioner("killer")
class KillOnceHandler(BlipCaptionHandler):
    """Kills its own process the first time it sees an image of TRIGGER_SIZE."""

    def predict(self, model: BlipCaptioner, batch: Sequence[Image.Image]) -> list[list[str]]:
        marker = os.environ[MARKER_ENV]
        if any(image.size == TRIGGER_SIZE for image in batch) and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(model, batch)


@register_captioner("stall")
class StallHandler(BlipCaptionHandler):
    """Captions normally until STALL_AFTER files match STALL_GLOB, then hangs until killed:
    a job caught part way, with some of its work checkpointed and some not."""

    def predict(self, model: BlipCaptioner, batch: Sequence[Image.Image]) -> list[list[str]]:
        if len(glob.glob(os.environ[STALL_GLOB_ENV])) >= int(os.environ[STALL_AFTER_ENV]):
            open(os.environ[STALLED_MARKER_ENV], "w").close()
            while True:
                time.sleep(1)
        return super().predict(model, batch)
