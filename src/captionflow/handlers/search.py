"""Choosing tokens: sampling, greedy and beam search exactly as transformers' `generate` does
them, over any model that steps its own caches (a `Stepper`).

The same settings and seed give the same token ids as `generate` (float rounding aside): the
logits processors run in `generate`'s order, sampling draws the same random numbers
(`torch.multinomial` of one sample is an argmax of probabilities over exponential noise, one
draw per vocabulary entry and row), and beam search is transformers' vectorized algorithm.
What differs is the cost: no per-step Python in the model, no full-vocabulary sort for the
nucleus, and images whose candidates have all ended stop costing model work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import GenerationConfig

from captionflow.handlers.decoding import DecodingOptions

# Compacting the model's batch copies its caches: done when a quarter of it has finished.
COMPACT_FRACTION = 0.25
# Beam search scores that rule a continuation out (transformers' constant).
EXCLUDED = -1.0e9
# Settings a model's generation config may hold that this module does not implement: a model
# that sets one is decoded by `generate`.
NOT_IMPLEMENTED = (
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_p",
    "top_h",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "guidance_scale",
    "num_beam_groups",
    "diversity_penalty",
    "watermarking_config",
    # Other searches (constrained, contrastive, DoLa, assisted), stops and prompt rewrites:
    # `generate` writes other tokens with them, or refuses the call.
    "constraints",
    "force_words_ids",
    "penalty_alpha",
    "dola_layers",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "use_mtp",
    "token_healing",
    "stop_strings",
    "max_time",
)
# The settings that change the tokens and that `generate` takes from a model's generation
# config (the decoding options give the rest).
FROM_MODEL_CONFIG = ("top_k", "length_penalty", "early_stopping", *NOT_IMPLEMENTED)


@dataclass(frozen=True)
class SearchSettings:
    """How to search, with every default already resolved the way `generate` resolves it."""

    strategy: Literal["sample", "greedy", "beam"]
    rows_per_image: int  # candidates (sample, greedy) or beams (beam) per image
    num_return: int  # sequences returned per image
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to end
    seed: int | None = None  # sampling: a generator per image (see `image_generators`)
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @classmethod
    def of(
        cls,
        decoding: DecodingOptions,
        model_config: GenerationConfig,
        *,
        eos: int,
        pad: int | None,
        bad_words: tuple[tuple[int, ...], ...] = (),
    ) -> SearchSettings:
        """What `generate(**decoding.generate_kwargs())` does on a model with this generation
        config: the model's own values where the options leave them open, else transformers'
        defaults (a top-k cut of 50 before the nucleus, among them)."""
        kwargs = decoding.generate_kwargs()
        defaults = generate_defaults()

        def model_or_default(name: str) -> object:
            value = getattr(model_config, name, None)
            return defaults[name] if value is None else value

        beams = kwargs["num_beams"]
        strategy = "sample" if kwargs["do_sample"] else "beam" if beams > 1 else "greedy"
        return cls(
            strategy=strategy,
            rows_per_image=beams if strategy == "beam" else kwargs["num_return_sequences"],
            num_return=kwargs["num_return_sequences"],
            max_new_tokens=kwargs["max_new_tokens"],
            eos_token_id=eos,
            pad_token_id=eos if pad is None else pad,  # as generate pads without a pad token
            min_new_tokens=kwargs["min_new_tokens"],
            repetition_penalty=kwargs["repetition_penalty"],
            temperature=kwargs.get("temperature", 1.0),
            top_k=int(model_or_default("top_k") or 0),
            top_p=kwargs.get("top_p", 1.0),
            # generate's NoBadWordsLogitsProcessor never bars the end token alone.
            bad_words=tuple(words for words in bad_words if words != (eos,)),
            seed=decoding.seed,
            length_penalty=float(model_or_default("length_penalty")),
            early_stopping=model_or_default("early_stopping"),  # type: ignore[arg-type]
        )


def generate_defaults() -> dict[str, object]:
    """What `generate` uses for a setting neither the call nor the model sets (transformers 5
    keeps them in one private place; these are its values where it does not: older versions
    write the neutral ones, such as `typical_p=1.0`, into every generation config)."""
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if defaults:
        return defaults()
    return {
        "top_k": 50,
        "length_penalty": 1.0,
        "early_stopping": False,
        "typical_p": 1.0,
        "encoder_repetition_penalty": 1.0,
        "num_beam_groups": 1,
    }


def not_implemented(model_config: GenerationConfig) -> list[str]:
    """The settings of a model's generation config that only `generate` implements."""
    defaults = generate_defaults()
    return [
        name
        for name in NOT_IMPLEMENTED
        if getattr(model_config, name, None) not in (None, False, defaults.get(name))
    ]


def not_read(saved: GenerationConfig, used: GenerationConfig) -> list[str]:
    """The settings of `saved` (a checkpoint's own generation config) that would change the
    tokens but that `used` (the config `generate` actually decodes with) does not hold."""
    defaults = generate_defaults()

    def changed(name: str) -> bool:  # `is`, not `in`: a top_k of 0 is a setting, not False
        value = getattr(saved, name, None)
        return not (value is None or value is False or value == defaults.get(name))

    return [
        name
        for name in FROM_MODEL_CONFIG
        if changed(name) and getattr(saved, name, None) != getattr(used, name, None)
    ]


class Stepper(Protocol):
    """A model's decoding state for one batch of images, `rows_per_image` rows each."""

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt (shared by every row) through the model; next-token logits of every
        row, float32 [rows, vocab]."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to each active row; their next-token logits, float32."""
        ...

    def keep_images(self, images: torch.Tensor) -> None:
        """Continue with only these of the active images (indices into the active ones)."""
        ...

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Row i continues from the state of row `rows[i]` (beam search; within its image)."""
        ...


def search(
    stepper: Stepper,
    prompt: torch.Tensor,
    images: int,
    settings: SearchSettings,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Token ids [images * num_return, length], laid out as `generate` returns them. With
    `generators` (one per image), sampling draws each image's noise from its own."""
    if settings.strategy == "beam" and settings.rows_per_image > 1:
        return beam_search(stepper, prompt, images, settings)
    return sample_or_greedy(stepper, prompt, images, settings, generators)


def image_generators(pixel_values: torch.Tensor, seed: int) -> list[torch.Generator]:
    """A generator per image, seeded by `seed` and the image's pixels (an exact integer
    fingerprint of them, the same in any batch), on the pixels' device."""
    shape = pixel_values.shape[1:]
    weights = torch.randint(
        1, 2**31, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int64
    ).to(pixel_values.device)
    levels = (pixel_values.float() * 256).round().to(torch.int64)
    fingerprints = (levels * weights).flatten(1).sum(dim=1).tolist()
    generators = []
    for fingerprint in fingerprints:
        generator = torch.Generator(pixel_values.device)
        generator.manual_seed(hash((seed, fingerprint)) & (2**63 - 1))
        generators.append(generator)
    return generators


def sample_or_greedy(
    stepper: Stepper,
    prompt: torch.Tensor,
    images: int,
    settings: SearchSettings,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """`generate`'s `_sample` loop; rows of finished images leave the model's batch."""
    per_image = settings.rows_per_image
    rows = images * per_image
    device = prompt.device
    start = prompt.shape[0]
    max_length = start + settings.max_new_tokens
    tokens = torch.full((rows, max_length), settings.pad_token_id, dtype=torch.long, device=device)
    tokens[:, :start] = prompt
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    active_images = torch.arange(images, device=device)
    active_rows = torch.arange(rows, device=device)
    compacted_at = images
    logits = stepper.prefill(prompt)
    length = start
    while True:
        scores = process_logits(tokens[active_rows, :length], logits, length - start, settings)
        chosen = torch.full_like(unfinished, settings.pad_token_id, dtype=torch.long)
        if settings.strategy == "sample":
            if generators is None:
                noise = exponential_noise((rows, scores.shape[-1]), device)[active_rows]
            else:
                noise = torch.cat(
                    [
                        torch.empty((per_image, scores.shape[-1]), device=device).exponential_(
                            1, generator=generators[image]
                        )
                        for image in active_images.tolist()
                    ]
                )
            chosen[active_rows] = sample_nucleus(scores, noise, settings)
        else:
            chosen[active_rows] = scores.argmax(dim=-1)
        chosen = torch.where(unfinished, chosen, settings.pad_token_id)
        tokens[:, length] = chosen
        length += 1
        unfinished &= chosen != settings.eos_token_id
        if length >= max_length or not bool(unfinished.any()):
            return tokens[:, :length]
        live = unfinished.view(images, per_image).any(dim=1)[active_images]
        if int(live.sum()) <= (1 - COMPACT_FRACTION) * compacted_at:
            kept = live.nonzero().squeeze(1)
            stepper.keep_images(kept)
            active_images = active_images[kept]
            compacted_at = len(active_images)
            active_rows = (
                active_images[:, None] * per_image + torch.arange(per_image, device=device)
            ).flatten()
        logits = stepper.step(tokens[active_rows, length - 1])


def process_logits(
    tokens: torch.Tensor, scores: torch.Tensor, new_tokens: int, settings: SearchSettings
) -> torch.Tensor:
    """`generate`'s logits processors that apply to every strategy, in its order: repetition
    penalty over every token so far (prompt included), bad words (a sequence's last token is
    barred where the tokens so far end with the rest of it), no end before `min_new_tokens`."""
    scores = scores.clone()
    if settings.repetition_penalty != 1.0:
        seen = scores.gather(1, tokens)
        penalty = settings.repetition_penalty
        scores.scatter_(1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))
    for *start, last in settings.bad_words:
        if not start:
            scores[:, last] = -torch.inf
        elif len(start) <= tokens.shape[1]:
            ends_with_start = (tokens[:, -len(start) :] == tokens.new_tensor(start)).all(dim=1)
            scores[ends_with_start, last] = -torch.inf
    if new_tokens < settings.min_new_tokens:
        scores[:, settings.eos_token_id] = -torch.inf
    return scores


def sample_nucleus(
    scores: torch.Tensor, noise: torch.Tensor, settings: SearchSettings
) -> torch.Tensor:
    """One token per row: temperature, top-k, top-p, then `multinomial`'s draw.

    The nucleus is cut from the top-k only (`generate` sorts the whole vocabulary; the tokens
    outside the top k have probability 0 by then, so the cut is the same). Like `generate`,
    the cut keeps the tokens tied with the k-th (half-precision logits tie often): the top 2k
    are taken and those below the k-th masked, exact unless over k tokens tie with it (no
    wait on the device to count them). Without a top-k cut (`top_k` 0) the whole vocabulary
    is sorted, as `generate` does.
    """
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    vocab = scores.shape[-1]
    k = min(settings.top_k, vocab) if settings.top_k > 0 else vocab
    if k < vocab:
        values, ids = torch.topk(scores, min(2 * k, vocab))
        values = values.masked_fill(values < values[:, k - 1 : k], -torch.inf)
    else:
        values, ids = torch.sort(scores, dim=-1, descending=True)
    if settings.top_p < 1.0:
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        cut = cumulative <= 1 - settings.top_p
        cut[:, -1] = False
        values = values.masked_fill(cut.flip(-1), -torch.inf)
    probabilities = values.softmax(dim=-1)
    pick = (probabilities / noise.gather(1, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(1, pick).squeeze(1)


def exponential_noise(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The Exponential(1) draws `torch.multinomial` makes for one sample per row. On the CPU
    they are made from float64 uniforms, the same numbers 3x faster (checked once)."""
    if device.type == "cpu" and _uniforms_make_exponentials():
        uniforms = torch.empty(shape, dtype=torch.float64).uniform_()
        return torch.log1p(uniforms.neg_()).neg_().float()
    return torch.empty(shape, device=device).exponential_(1)


@functools.cache
def _uniforms_make_exponentials() -> bool:
    exponentials = torch.empty(4096).exponential_(1, generator=torch.Generator().manual_seed(0))
    uniforms = torch.empty(4096, dtype=torch.float64).uniform_(
        generator=torch.Generator().manual_seed(0)
    )
    return torch.equal(exponentials, (-torch.log1p(-uniforms)).float())


def beam_search(
    stepper: Stepper, prompt: torch.Tensor, images: int, settings: SearchSettings
) -> torch.Tensor:
    """`generate`'s vectorized beam search (transformers 5), without sampling. Reordering beams
    reorders only the model's self-attention caches, within each image."""
    beams = settings.rows_per_image
    device = prompt.device
    start = prompt.shape[0]
    max_length = start + settings.max_new_tokens
    keep = 2 * beams  # one end-of-sequence token: transformers' max(2, 1 + n_eos) * beams
    top_beams = torch.arange(keep, device=device) < beams
    # transformers fills with `pad or eos`: a pad id of 0 reads as false there.
    fill = settings.pad_token_id or settings.eos_token_id
    running = torch.full((images, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :start] = prompt
    finished_sequences = running.clone()
    running_scores = torch.zeros((images, beams), device=device)
    running_scores[:, 1:] = EXCLUDED
    finished_scores = torch.full((images, beams), EXCLUDED, device=device)
    is_finished = torch.zeros((images, beams), dtype=torch.bool, device=device)
    may_improve = torch.ones((images, 1), dtype=torch.bool, device=device)
    generated = settings.max_new_tokens
    running_origins = torch.full((images, beams, generated), -1, dtype=torch.int32, device=device)
    finished_origins = running_origins.clone()
    offsets = torch.arange(images, device=device)[:, None] * beams
    logits = stepper.prefill(prompt)
    length = start
    while True:
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = process_logits(
            running[:, :, :length].flatten(0, 1), log_probs, length - start, settings
        )
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(images, beams, vocab) + running_scores[:, :, None]).flatten(1)
        top_scores, top_ids = torch.topk(log_probs, keep)
        from_beam = top_ids // vocab
        candidates = _gather_beams(running, from_beam)
        candidates[:, :, length] = top_ids % vocab
        candidate_origins = _gather_beams(running_origins, from_beam)
        candidate_origins[:, :, length - start] = (from_beam + offsets).to(torch.int32)
        ends = (candidates[:, :, length] == settings.eos_token_id) | (length + 1 >= max_length)

        running_candidates = top_scores + ends.float() * EXCLUDED
        best_running = torch.topk(running_candidates, beams)[1]
        running = _gather_beams(candidates, best_running)
        running_scores = _gather_beams(running_candidates, best_running)
        running_origins = _gather_beams(candidate_origins, best_running)

        just_finished = ends & top_beams[None, :]
        final_scores = top_scores / ((length + 1 - start) ** settings.length_penalty)
        all_full = is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
        final_scores = final_scores + all_full.float() * EXCLUDED
        final_scores = final_scores + (~may_improve).float() * EXCLUDED
        final_scores = final_scores + (~just_finished) * EXCLUDED
        merged_scores = torch.cat((finished_scores, final_scores), dim=1)
        best_finished = torch.topk(merged_scores, beams)[1]
        finished_sequences = _gather_beams(
            torch.cat((finished_sequences, candidates), 1), best_finished
        )
        finished_scores = _gather_beams(merged_scores, best_finished)
        finished_origins = _gather_beams(
            torch.cat((finished_origins, candidate_origins), 1), best_finished
        )
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), 1), best_finished)

        stepper.reorder_rows(running_origins[..., length - start].flatten().long())
        length += 1
        may_improve = may_improve & _may_improve(
            running_scores,
            finished_scores,
            is_finished,
            length - start,
            max_length - start,
            settings,
        )
        open_beams = not (bool(is_finished.all()) and settings.early_stopping is True)
        if not (bool(may_improve.any()) and open_beams and not bool(ends.all())):
            break
        logits = stepper.step(running[:, :, length - 1].flatten())
    returned = settings.num_return
    sequences = finished_sequences[:, :returned].flatten(0, 1)
    origins = finished_origins[:, :returned].flatten(0, 1)
    longest = int((origins + 1).bool().sum(dim=1).max())
    return sequences[:, : start + longest]


def _may_improve(
    running_scores: torch.Tensor,
    finished_scores: torch.Tensor,
    is_finished: torch.Tensor,
    generated: int,
    max_generated: int,
    settings: SearchSettings,
) -> torch.Tensor:
    """transformers' early-stop heuristic: can the best running beam still beat the worst
    finished one?"""
    penalty = settings.length_penalty
    hypothetical = (
        max_generated if settings.early_stopping == "never" and penalty > 0.0 else generated
    )
    best_running = running_scores[:, :1] / (hypothetical**penalty)
    worst_finished = torch.where(
        is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], EXCLUDED
    )
    return torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)
