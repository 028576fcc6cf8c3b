"""The benchmarks' zero-cost stand-ins for BLIP and CLIP: the same views and batches as the
real handlers, answered at once, so that a run measures the pipeline alone."""

from __future__ import annotations

from benchmarks.nomodels import NoCaptioner, NoRanker
from captionflow.engine import EngineSpec
from captionflow.handlers import BlipCaptionHandler, ClipRankHandler, DecodingOptions
from captionflow.handlers.registry import captioner_handler, ranker_handler
from captionflow.views import ViewBatch, make_views
from tests.conftest import random_image


def test_stand_ins_take_the_real_models_views_and_answer_every_image(
    tiny_blip: str, tiny_clip: str
) -> None:
    captioner = captioner_handler(f"no-captioner:{tiny_blip}", decoding=DecodingOptions())
    ranker = ranker_handler(f"no-ranker:{tiny_clip}")
    assert isinstance(captioner, NoCaptioner) and isinstance(ranker, NoRanker)
    specs = [captioner.view_spec(), ranker.view_spec()]
    assert specs == [
        BlipCaptionHandler(tiny_blip).view_spec(),
        ClipRankHandler(tiny_clip).view_spec(),
    ]
    batch = ViewBatch.stack([make_views(random_image(seed=i), specs) for i in range(3)])
    ranked = EngineSpec(captioner, ranker, mode="local").load().caption_and_rank(batch)
    assert len(ranked) == 3
    for candidates in ranked:
        assert len(candidates) == DecodingOptions().num_captions
        assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)


def test_decoding_benchmark_checks_and_times_steps_on_a_tiny_blip(tiny_blip: str) -> None:
    """bench-gpu's decoding part (run first on a GPU box): token ids of both decoders, and
    milliseconds per step of each, through transformers' own cache API for `generate`'s."""
    from benchmarks.decoding import check, step_times

    checked = check(tiny_blip, "cpu", "float32", images=2)
    assert all(row["identical_rows"] == row["rows"] > 0 for row in checked.values())
    steps = step_times(tiny_blip, "cpu", "float32", rows=[10])
    assert steps[10]["fast_ms"] > 0 and steps[10]["reference_ms"] > 0
    assert steps[10]["compiled_ms"] > 0
    assert steps[10]["compiled_cudagraph_skips"] == 0  # none asked for on a CPU
