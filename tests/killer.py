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
from collections.abc import Callable

from captionflow.handlers import BlipCaptionHandler, register_captioner
from captionflow.handlers.base import Captioner, ModelImages
from captionflow.views import ViewBatch

TRIGGER_SIZE = (61, 47)
MARKER_ENV = "CAPTIONFLOW_TEST_KILL_MARKER"
STALL_GLOB_ENV = "CAPTIONFLOW_TEST_STALL_GLOB"  # files to count (the run's checkpoints)
STALL_AFTER_ENV = "CAPTIONFLOW_TEST_STALL_AFTER"  # stall once this many exist
STALLED_MARKER_ENV = "CAPTIONFLOW_TEST_STALLED_MARKER"  # created when the stall begins


def image_sizes(images: ModelImages) -> list[tuple[int, int]]:
    """The decoded (width, height) of each image of a model call, pictures or views."""
    return list(images.sizes) if isinstance(images, ViewBatch) else [i.size for i in images]


class Misbehaving:
    """A loaded captioner that calls `before(images)` ahead of each batch: the model itself
    misbehaves, whichever route (engine or RunInference handler) calls it."""

    def __init__(self, model: Captioner, before: Callable[[ModelImages], None]) -> None:
        self.model = model
        self.before = before

    def caption(self, images: ModelImages) -> list[list[str]]:
        self.before(images)
        return self.model.caption(images)


class MisbehavingHandler(BlipCaptionHandler):
    """A BLIP handler whose model runs `self.before(images)` ahead of each batch."""

    def before(self, images: ModelImages) -> None:
        raise NotImplementedError

    def load_model(self) -> Captioner:  # type: ignore[override]
        return Misbehaving(super().load_model(), self.before)


@register_captioner("killer")
class KillOnceHandler(MisbehavingHandler):
    """Kills its own process the first time it sees an image of TRIGGER_SIZE."""

    def before(self, images: ModelImages) -> None:
        marker = os.environ[MARKER_ENV]
        if TRIGGER_SIZE in image_sizes(images) and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@register_captioner("stall")
class StallHandler(MisbehavingHandler):
    """Captions normally until STALL_AFTER files match STALL_GLOB, then hangs until killed:
    a job caught part way, with some of its work checkpointed and some not."""

    def before(self, images: ModelImages) -> None:
        if len(glob.glob(os.environ[STALL_GLOB_ENV])) >= int(os.environ[STALL_AFTER_ENV]):
            open(os.environ[STALLED_MARKER_ENV], "w").close()
            while True:
                time.sleep(1)
