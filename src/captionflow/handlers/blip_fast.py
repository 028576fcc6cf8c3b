"""BLIP's forward pass rebuilt for decoding many candidates per image.

`generate` keeps K copies of each image's cross-attention keys and values (one per beam or
sample) and copies them again on every beam reorder. Here each image's keys and values are
projected once per layer, and its K rows attend to them as one group: their queries are
stacked along the query axis of one scaled-dot-product attention call per image. Self-attention
keys and values live in a cache allocated once for the whole caption length. The model's own
modules (and weights) are used as they are; the model is not changed, so every other use of
it is unaffected.

Compiled (`compiled=True`, `--decoder compiled`), a decode step is one static-shape function
(the new token written at a position given as a tensor, attention masked to the positions so
far) compiled with `torch.compile`, with CUDA graphs on a GPU (`mode="reduce-overhead"`): no
per-operation dispatch from Python. Image counts are padded to powers of two, so that a handful
of shapes is compiled, not one per batch size or per compaction. The caches and image keys it
reads and writes live in buffers kept per shape (`StaticBuffers`): a graph holds its tensors'
addresses, and torch records no graph for a step that writes into a tensor of changing
address. A step that fails to compile falls back to the eager step, with a warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration

logger = logging.getLogger(__name__)
# Shapes a compiled step may see: powers of two up to 2**16 images, per search strategy.
COMPILED_SHAPES = 64
Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # keys and values, one pair per layer


class StaticBuffers(threading.local):
    """The tensors a compiled step reads and writes, one set per shape, kept from batch to
    batch: a CUDA graph is recorded again for any of them at a new address. Per thread, as
    two batches decoding at once must not share them. They hold memory for every image count
    seen (a power of two): at most twice the largest batch's."""

    def __init__(self) -> None:
        self.sets: dict[tuple, Pairs] = {}

    def pairs(self, layers: int, shape: tuple[int, ...], like: torch.Tensor) -> Pairs:
        key = (layers, shape, like.dtype, like.device)
        if key not in self.sets:
            self.sets[key] = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(layers)]
            for pair in self.sets[key]:
                for tensor in pair:
                    torch._dynamo.mark_static_address(tensor)
        return self.sets[key]


class FastBlip:
    """The vision tower with SDPA attention, and `Steps` over the text decoder."""

    def __init__(self, model: BlipForConditionalGeneration, *, compiled: bool = False) -> None:
        self.model = model
        text = model.text_decoder
        self.embeddings = text.bert.embeddings
        self.layers = list(text.bert.encoder.layer)
        self.head = text.cls
        self.heads = text.config.num_attention_heads
        self.max_positions = text.config.max_position_embeddings
        self.compiled_step = _compile(self.static_step, model.device) if compiled else None
        self.buffers = StaticBuffers() if compiled else None

    def static_step(
        self,
        tokens: torch.Tensor,
        position: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        per_image: int,
    ) -> torch.Tensor:
        """One token for every row at `position` (a 0-d tensor): the same arithmetic as
        `Steps.step`, with shapes that do not change from step to step."""
        hidden = self.embeddings(input_ids=tokens[:, None], position_ids=position.view(1, 1))
        length = cache[0][0].shape[2]
        seen = (torch.arange(length, device=tokens.device) <= position).view(1, 1, 1, length)
        where = position.view(1)
        for layer, (keys, values), (image_keys, image_values) in zip(
            self.layers, cache, cross, strict=True
        ):
            attention = layer.attention.self
            keys.index_copy_(2, where, _heads(attention.key(hidden), self.heads))
            values.index_copy_(2, where, _heads(attention.value(hidden), self.heads))
            query = _heads(attention.query(hidden), self.heads)
            context = F.scaled_dot_product_attention(query, keys, values, attn_mask=seen)
            hidden = layer.attention.output(_merge_heads(context), hidden)
            query = _heads(layer.crossattention.self.query(hidden), self.heads)
            context = _grouped_attention(query, image_keys, image_values, per_image)
            hidden = layer.crossattention.output(_merge_heads(context), hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.head(hidden[:, -1]).float()

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings, as `model.vision_model(...)[0]`, with SDPA attention."""
        vision = self.model.vision_model
        hidden = vision.embeddings(pixel_values)
        for layer in vision.encoder.layers:
            hidden = hidden + _vision_attention(layer.self_attn, layer.layer_norm1(hidden))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return vision.post_layernorm(hidden)

    @torch.inference_mode()
    def steps(self, image_embeds: torch.Tensor, rows_per_image: int, max_length: int) -> Steps:
        return Steps(self, image_embeds, rows_per_image, max_length)


class Steps:
    """One batch of images being decoded, `rows_per_image` rows each (a `search.Stepper`).

    With a compiled step, the batch holds `capacity` images (a power of two); the images past
    the real ones are copies of the last, computed and never returned."""

    def __init__(
        self, blip: FastBlip, image_embeds: torch.Tensor, rows_per_image: int, max_length: int
    ) -> None:
        if max_length > blip.max_positions:
            raise ValueError(
                f"captions of {max_length} tokens exceed the model's {blip.max_positions} positions"
            )
        self.blip = blip
        self.per_image = rows_per_image
        self.length = 0
        self.images = images = image_embeds.shape[0]
        if blip.compiled_step is not None:
            image_embeds = image_embeds[_padded(torch.arange(images, device=image_embeds.device))]
            images = image_embeds.shape[0]
        # Contiguous: every step reads them whole (SDPA would copy a strided view each time).
        self.cross = self._placed(
            [
                (
                    _heads(layer.crossattention.self.key(image_embeds), blip.heads).contiguous(),
                    _heads(layer.crossattention.self.value(image_embeds), blip.heads).contiguous(),
                )
                for layer in blip.layers
            ]
        )
        head_dim = self.cross[0][0].shape[-1]
        shape = (images * rows_per_image, blip.heads, max_length, head_dim)
        like = self.cross[0][0]
        # Zeros, not garbage: a compiled step attends over the whole length with the unwritten
        # positions masked, and a masked NaN or infinity would still poison the softmax.
        if blip.buffers is None:
            self.cache = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in blip.layers]
        else:
            self.cache = blip.buffers.pairs(len(blip.layers), shape, like)
            for keys, values in self.cache:
                keys.zero_()
                values.zero_()

    @property
    def rows(self) -> int:
        return self.images * self.per_image

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt is run once per image and its state given to each of the image's rows."""
        images = self.cross[0][0].shape[0]
        tokens = prompt.expand(images, -1)
        logits = self._forward(tokens, per_image=1, fill=self.per_image)
        return logits.repeat_interleave(self.per_image, dim=0)[: self.rows]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        capacity = self.cache[0][0].shape[0]
        padded = torch.cat([tokens, tokens[-1:].expand(capacity - len(tokens))])
        if self.blip.compiled_step is not None:
            position = torch.tensor(self.length, device=tokens.device)
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are spent
            try:
                logits = self.blip.compiled_step(
                    padded, position, self.cache, self.cross, self.per_image
                )
            except Exception as error:  # a compiler's failure must not cost the captions
                logger.warning("the compiled decode step failed (%s); decoding eagerly", error)
                self.blip.compiled_step = None
            else:
                self.length += 1
                return logits[: len(tokens)]
        return self._forward(padded[:, None], per_image=self.per_image, fill=1)[: len(tokens)]

    def keep_images(self, images: torch.Tensor) -> None:
        self.images = len(images)
        if self.blip.compiled_step is not None:
            images = _padded(images)
        rows = (
            images[:, None] * self.per_image + torch.arange(self.per_image, device=images.device)
        ).flatten()
        self.cross = self._placed([(k[images], v[images]) for k, v in self.cross])
        self.cache = self._placed([(k[rows], v[rows]) for k, v in self.cache])

    def _placed(self, pairs: Pairs) -> Pairs:
        """`pairs` as they are; compiled, copied into the static buffers of their shape."""
        if self.blip.buffers is None:
            return pairs
        like = pairs[0][0]
        placed = self.blip.buffers.pairs(len(pairs), tuple(like.shape), like)
        for (keys, values), (new_keys, new_values) in zip(placed, pairs, strict=True):
            keys.copy_(new_keys)
            values.copy_(new_values)
        return placed

    def reorder_rows(self, rows: torch.Tensor) -> None:
        capacity = self.cache[0][0].shape[0]
        rows = torch.cat([rows, torch.arange(len(rows), capacity, device=rows.device)])
        for keys, values in self.cache:
            keys[:, :, : self.length] = keys[rows, :, : self.length]
            values[:, :, : self.length] = values[rows, :, : self.length]

    def _forward(self, tokens: torch.Tensor, *, per_image: int, fill: int) -> torch.Tensor:
        """Next-token logits of the last position; `tokens` [rows, new] extend every row
        (each repeated `fill` times into the cache)."""
        blip = self.blip
        start, new = self.length, tokens.shape[1]
        positions = torch.arange(start, start + new, device=tokens.device)[None, :]
        hidden = blip.embeddings(input_ids=tokens, position_ids=positions)
        for layer, (keys, values), (image_keys, image_values) in zip(
            blip.layers, self.cache, self.cross, strict=True
        ):
            attention = layer.attention.self
            new_keys = _heads(attention.key(hidden), blip.heads)
            new_values = _heads(attention.value(hidden), blip.heads)
            if fill > 1:
                new_keys = new_keys.repeat_interleave(fill, dim=0)
                new_values = new_values.repeat_interleave(fill, dim=0)
            keys[:, :, start : start + new] = new_keys
            values[:, :, start : start + new] = new_values
            query = _heads(attention.query(hidden), blip.heads)
            if fill > 1:  # the prompt: every row of an image holds the same, computed once
                keys_so_far = keys[::fill, :, : start + new]
                values_so_far = values[::fill, :, : start + new]
            else:
                keys_so_far = keys[:, :, : start + new]
                values_so_far = values[:, :, : start + new]
            context = F.scaled_dot_product_attention(
                query, keys_so_far, values_so_far, is_causal=new > 1
            )
            hidden = layer.attention.output(_merge_heads(context), hidden)
            query = _heads(layer.crossattention.self.query(hidden), blip.heads)
            context = _grouped_attention(query, image_keys, image_values, per_image)
            hidden = layer.crossattention.output(_merge_heads(context), hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        self.length = start + new
        return blip.head(hidden[:, -1]).float()


def _padded(images: torch.Tensor) -> torch.Tensor:
    """Image indices padded with the last to a power of two."""
    capacity = 1 << (len(images) - 1).bit_length()
    return torch.cat([images, images[-1:].expand(capacity - len(images))])


def _compile(
    step: Callable[..., torch.Tensor], device: torch.device
) -> Callable[..., torch.Tensor]:
    import torch._dynamo

    config = torch._dynamo.config
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), COMPILED_SHAPES))
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)


def _grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, per_image: int
) -> torch.Tensor:
    """Rows [images * per_image, heads, new, dim] attend to their image's keys and values
    [images, heads, tokens, dim]: the rows of an image become one longer query."""
    rows, heads, new, dim = query.shape
    images = rows // per_image
    grouped = query.view(images, per_image, heads, new, dim).transpose(1, 2)
    context = F.scaled_dot_product_attention(
        grouped.reshape(images, heads, per_image * new, dim), keys, values
    )
    return (
        context.view(images, heads, per_image, new, dim)
        .transpose(1, 2)
        .reshape(rows, heads, new, dim)
    )


def _vision_attention(attention: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    batch, tokens, width = hidden.shape
    heads = attention.num_heads
    qkv = attention.qkv(hidden).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return attention.projection(_merge_heads(context))


def _heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, tokens, width] -> [batch, heads, tokens, width / heads]."""
    batch, tokens, width = states.shape
    return states.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(context: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = context.shape
    return context.transpose(1, 2).reshape(batch, tokens, heads * dim)
