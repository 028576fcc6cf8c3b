"""Beam's side of an engine: a captioner and a ranker as one RunInference model.

Each worker thread's batch (its images' views stacked per model input) goes to the machine's
engine in one call and comes back captioned and ranked; the engine merges the batches of all
threads and processes into its own, larger ones. Failure isolation is the handlers' usual: a
failing batch is tried in halves, down to the one image that fails.
"""

from __future__ import annotations

from collections.abc import Sequence

from captionflow.engine import EngineClient, EngineMode, EngineSpec, Ranked
from captionflow.handlers.base import (
    CaptionModelHandler,
    IsolatingModelHandler,
    ModelImage,
    RankModelHandler,
)


class CaptionRankHandler(IsolatingModelHandler[ModelImage, Ranked, EngineClient]):
    """Images in; each image's candidates (from `captioner`), scored by `ranker`, best first.

    `max_batch_size` is each thread's request; `engine_batch_size` the most images per model
    call once requests are merged (the GPU batch). `engine`: `local` (an engine in each
    process), `shared` (one engine process per GPU, or `engines` of them, serving every
    process of the machine), or `auto` (shared where there is a GPU or `engines` is set).
    """

    kind = "engine"

    def __init__(
        self,
        captioner: CaptionModelHandler,
        ranker: RankModelHandler,
        *,
        max_batch_size: int | None = None,
        engine_batch_size: int = 256,
        engine: EngineMode = "auto",
        engines: int | None = None,
    ) -> None:
        request = max_batch_size or captioner.batch_elements_kwargs()["max_batch_size"]
        super().__init__(max_batch_size=request)
        self.spec = EngineSpec(
            captioner,
            ranker,
            max_batch_size=max(engine_batch_size, request),
            rank_batch_size=ranker.batch_elements_kwargs()["max_batch_size"],
            mode=engine,
            copies=engines,
        )
        self.model_id = f"{captioner.name}+{ranker.name}"

    @property
    def name(self) -> str:
        return self.model_id

    def load_model(self) -> EngineClient:
        return EngineClient(self.spec)

    def predict(self, model: EngineClient, batch: Sequence[ModelImage]) -> list[Ranked]:
        return model.caption_and_rank(model.stack(batch))
