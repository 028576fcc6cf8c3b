"""LAVIS backend (salesforce-lavis 1.0.2): BLIP captioning and CLIP ranking, as captionflow
handlers (`--captioner lavis-blip`, `--ranker lavis-clip`).

LAVIS pins transformers<4.27, so it lives in an environment of its own (`make install-lavis`); this
module imports LAVIS only inside `load_model`, so it imports (and its handlers can be named,
pickled and shipped) wherever captionflow does.

Model references, after `lavis-blip:` (default `base_coco`):

- `base_coco`, `large_coco`: LAVIS's BLIP caption model types, with the checkpoint their LAVIS
  config names (downloaded once into LAVIS's cache, like `load_model` does);
- `TYPE:/path/model.pth` (or `gs://...`): that model type with these weights, e.g.
  `base_coco:/models/model_base_caption_capfilt_large.pth` (BLIP's own release) or a LAVIS
  `blip_coco_caption_base.pth`; `TYPE:random` for random weights (benchmarks, tests);
- `CONFIG.yaml[:WEIGHTS]`: a LAVIS model config of your own (its `model:` section as in
  LAVIS's `blip_caption_*.yaml`, its `preprocess:` section optional). Besides LAVIS's keys it
  may set `vit_depth` (keep the vision tower's first N blocks; LAVIS fixes 12 or 24), for
  reduced test models. A relative `med_config_path` is looked up beside the yaml first.

After `lavis-clip:` (default `ViT-B-32`): `TYPE[:WEIGHTS]`, TYPE any of LAVIS's CLIP
architectures (`ViT-B-32`, `ViT-B-32-quickgelu`, `ViT-L-14`, `RN50`, ...: the names in
`lavis/configs/models/clip/`), WEIGHTS a state dict in open_clip's layout (OpenAI's weights
need the `-quickgelu` type) or `random`; TYPE alone takes LAVIS's default pretrained weights
for it (`openai` for the ViT-B/L ones: downloaded and read by LAVIS itself, as TorchScript).

Every checkpoint file is read with `torch.load(weights_only=True)`: a nested `model` or
`state_dict` entry and a `module.` prefix are unwrapped; every weight the model needs must be
there (LAVIS itself loads with `strict=False`, so a wrong checkpoint silently leaves random
weights); weights the model does not use (a pre-training checkpoint's ITM heads, say) are
ignored with a log line.

Images arrive as decoded PIL pictures (these handlers declare no `view_spec`) and go through
LAVIS's own eval processors (`blip_image_eval` at the model's size, `clip_image_eval`).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from captionflow.handlers.base import CaptionModelHandler, ModelImages, RankModelHandler
from captionflow.handlers.candidates import per_image
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import ModelLoadError
from captionflow.handlers.ranking import best_first
from captionflow.handlers.registry import register_captioner, register_ranker
from captionflow.handlers.torch_setup import allow_tf32, resolve_device, resolve_dtype
from captionflow.paths import is_remote
from captionflow.records import ScoredCaption
from captionflow.views import ImageViews, ViewBatch

logger = logging.getLogger(__name__)

BLIP_TYPES = ("base_coco", "large_coco")
RANDOM = "random"  # in place of a checkpoint: random weights
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_YAML = re.compile(r"(?P<config>.+?\.ya?ml)(?::(?P<weights>.+))?", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
INSTALL_HINT = (
    "salesforce-lavis is not installed here: it needs transformers<4.27, so it runs in an "
    "environment of its own (`make install-lavis` builds one: .venv-lavis)"
)


@dataclass(frozen=True)
class LavisReference:
    """What to build (`config`: a LAVIS model type or a yaml path) and which weights to load
    (`weights`: a file or URI, `random`, or None for the config's own checkpoint)."""

    config: str
    weights: str | None

    @property
    def is_yaml(self) -> bool:
        return bool(_YAML.fullmatch(self.config))


def parse_reference(model: str, default_type: str) -> LavisReference:
    """`TYPE`, `TYPE:WEIGHTS`, `CONFIG.yaml[:WEIGHTS]` or `WEIGHTS` alone (with `default_type`).
    Checked for form only: whether TYPE exists is LAVIS's to say, where it is installed."""
    if not model:
        raise ValueError("empty model reference")
    if match := _YAML.fullmatch(model):
        return LavisReference(match["config"], match["weights"] or None)
    if _URI.match(model) or model.startswith(("/", ".", "~")):
        return LavisReference(default_type, model)
    kind, sep, weights = model.partition(":")
    if not sep and kind.lower().endswith(WEIGHT_SUFFIXES):
        return LavisReference(default_type, kind)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]*", kind):
        raise ValueError(f"{model!r}: expected TYPE, TYPE:WEIGHTS, CONFIG.yaml[:WEIGHTS]")
    if sep and not weights:
        raise ValueError(f"{model!r}: no weights after ':'")
    return LavisReference(kind, weights or None)


# ---------------------------------------------------------------------------------- weights


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read with `weights_only=True` from a local path or any Beam
    filesystem URI (`gs://...`)."""
    path = os.path.expanduser(path.removeprefix("file://"))
    source: Any = path
    if is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as remote:
            source = io.BytesIO(remote.read())
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a checkpoint that loads with weights_only=True ({error}); a "
            "TorchScript archive (OpenAI's CLIP .pt) must be converted to a state dict first"
        ) from error
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        raise ValueError(f"{path} holds no state dict of tensors")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def apply_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load `state` into `model`: every weight the model needs (position-id buffers aside)
    must be there with its shape; extra ones are dropped and counted."""
    own = model.state_dict()
    missing = [key for key in own if key not in state and not key.endswith("position_ids")]
    if missing:
        raise ValueError(
            f"{name} lacks {len(missing)} of the model's {len(own)} weights (first: "
            f"{', '.join(missing[:3])}): not a checkpoint of this model type"
        )
    _fit_position_embeddings(model, state)
    wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"{name}: {len(wrong)} weights have other shapes than the model's (first: {key} "
            f"{tuple(state[key].shape)} for {tuple(own[key].shape)}): another model type?"
        )
    unused = [key for key in state if key not in own]
    model.load_state_dict({key: state[key] for key in own if key in state}, strict=False)
    if unused:
        logger.info(
            "%s: ignored %d weights the model does not use (e.g. %s)",
            name,
            len(unused),
            ", ".join(unused[:3]),
        )


def _fit_position_embeddings(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A BLIP vision tower checkpoint at another image size: its position embeddings are
    interpolated, as LAVIS does for pre-training checkpoints."""
    key = "visual_encoder.pos_embed"
    encoder = getattr(model, "visual_encoder", None)
    if key in state and encoder is not None and state[key].shape != encoder.pos_embed.shape:
        from lavis.models.vit import interpolate_pos_embed

        state[key] = interpolate_pos_embed(state[key], encoder)


def check_reference(model: str, default_type: str) -> str | None:
    """Why `model` cannot be loaded from here, or None: malformed, a local config or weights
    file that is missing, or LAVIS not installed (remote files are left to the workers)."""
    try:
        reference = parse_reference(model, default_type)
    except ValueError as error:
        return str(error)
    files = [reference.config if reference.is_yaml else None, reference.weights]
    for path in files:
        local = path and path != RANDOM and not is_remote(path)
        if local and not os.path.isfile(os.path.expanduser(path.removeprefix("file://"))):
            return f"no such file: {path}"
    if importlib.util.find_spec("lavis") is None:
        return INSTALL_HINT
    return None


def _import_lavis() -> None:
    try:
        import lavis  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(f"{INSTALL_HINT} ({error})") from error


def _load_error(kind: str, flag: str, model: str, error: Exception) -> ModelLoadError:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return ModelLoadError(
        f"could not load the {kind} model {model!r} ({reason}); --{flag} {kind}:TYPE[:WEIGHTS] "
        "takes a LAVIS model type and a checkpoint file (see captionflow/handlers/lavis.py)"
    )


def _pictures(images: ModelImages, kind: str) -> list[Image.Image]:
    if isinstance(images, ViewBatch) or any(isinstance(i, ImageViews) for i in images):
        raise ValueError(f"{kind} takes decoded pictures, not the decode step's views")
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


# ------------------------------------------------------------------------------------ BLIP


def blip_config(reference: LavisReference) -> Any:
    """The OmegaConf of a LAVIS BLIP caption model: `model` and `preprocess` sections."""
    from lavis.models.blip_models.blip_caption import BlipCaption
    from omegaconf import OmegaConf

    if not reference.is_yaml:
        if reference.config not in BLIP_TYPES:
            raise ValueError(f"unknown model type {reference.config!r}: use one of {BLIP_TYPES}")
        return OmegaConf.load(BlipCaption.default_config_path(reference.config))
    path = os.path.expanduser(reference.config)
    if is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as remote:
            config = OmegaConf.create(remote.read().decode())
    else:
        config = OmegaConf.load(path)
        med = config.model.get("med_config_path")
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), med or "")
        if med and not os.path.isabs(med) and os.path.isfile(beside):
            config.model.med_config_path = beside
    if "model" not in config:
        raise ValueError(f"{path} has no model: section")
    return config


def build_blip(config: Any) -> Any:
    """A LAVIS `BlipCaption` of `config.model`'s architecture, random weights: what
    `BlipCaption.from_config` builds, without its checkpoint loading."""
    from lavis.models.blip_models.blip_caption import BlipCaption
    from lavis.models.med import XBertLMHeadDecoder
    from lavis.models.vit import VisionTransformerEncoder

    cfg = config.model
    image_encoder = VisionTransformerEncoder.from_config(cfg)
    if cfg.get("vit_depth"):
        image_encoder.blocks = image_encoder.blocks[: int(cfg.vit_depth)]
    text_decoder = XBertLMHeadDecoder.from_config(cfg)
    return BlipCaption(
        image_encoder,
        text_decoder,
        prompt=cfg.get("prompt", None),
        max_txt_len=cfg.get("max_txt_len", 40),
    )


def blip_processor(config: Any) -> Any:
    """LAVIS's eval image processor from the config (`blip_image_eval`), at the model's size
    unless the config's `preprocess:` says otherwise."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    eval_cfg = OmegaConf.select(config, "preprocess.vis_processor.eval")
    if eval_cfg is None:
        eval_cfg = OmegaConf.create({"name": "blip_image_eval"})
    eval_cfg = OmegaConf.merge(
        {"image_size": config.model.get("image_size", 384)}, eval_cfg
    )  # the processor's own image_size wins when given
    return registry.get_processor_class(eval_cfg.name).from_config(eval_cfg)


def blip_weights(config: Any, reference: LavisReference) -> str | None:
    """The checkpoint to load: the reference's, else the config's own (`finetuned`, or
    `pretrained` when `load_finetuned` is false), downloaded into LAVIS's cache if a URL."""
    if reference.weights is not None:
        return None if reference.weights == RANDOM else reference.weights
    cfg = config.model
    key = "finetuned" if cfg.get("load_finetuned", True) else "pretrained"
    source = cfg.get(key)
    if not source:
        raise ValueError(f"no weights given and the config names no {key!r} checkpoint")
    if re.match(r"https?://", source):
        from lavis.common.dist_utils import download_cached_file

        return download_cached_file(source, check_hash=False, progress=False)
    return source


class LavisBlipCaptioner:
    """A loaded LAVIS BLIP. Each image goes through the vision tower once; its K candidates are
    decoded from that one encoding, as LAVIS's `BlipCaption.generate` does (it repeats the
    image's embeddings K times for the text decoder, sampling K rows), with every captionflow
    decoding option passed on, the decoder's self-attention cache working under transformers
    4.26 (`_enable_decoder_cache`), and the image's cross-attention keys and values projected
    once per call rather than at every step (`_project_image_once`)."""

    def __init__(self, model: Any, vis_processor: Any, decoding: DecodingOptions) -> None:
        self.model = model.eval()
        self.vis_processor = vis_processor
        self.decoding = decoding
        tokenizer = model.tokenizer
        self.prompt = decoding.prompt_or(model.prompt or "a picture of ")
        ids = tokenizer(self.prompt).input_ids  # [CLS] ... [SEP]
        # BLIP's decoder prompt: [DEC] (LAVIS's BOS) in place of [CLS], without the [SEP].
        self.prompt_ids = [tokenizer.bos_token_id, *ids[1:-1]]
        self.prompt_text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        self.bad_words_ids = [
            ids
            for word in decoding.bad_words
            if (ids := tokenizer(word, add_special_tokens=False).input_ids)
        ]
        _enable_decoder_cache(model.text_decoder)
        self.projections = _project_image_once(model.text_decoder)
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)  # generate draws from torch's global generator

    @classmethod
    def load(
        cls,
        model: str,
        *,
        decoding: DecodingOptions,
        device: str = "auto",
        dtype: str = "auto",
    ) -> LavisBlipCaptioner:
        _import_lavis()
        try:
            torch_device = resolve_device(device, model_id=f"lavis-blip:{model}")
            torch_dtype = resolve_dtype(dtype, torch_device)
            allow_tf32(torch_device, torch_dtype)
            reference = parse_reference(model, BLIP_TYPES[0])
            config = blip_config(reference)
            blip = build_blip(config)
            weights = blip_weights(config, reference)
            if weights is None:
                logger.warning("lavis-blip %s: random weights, its captions are noise", model)
            else:
                apply_state_dict(blip, read_state_dict(weights), weights)
            blip = blip.to(torch_device, torch_dtype)
            processor = blip_processor(config)
        except ModelLoadError:
            raise
        except Exception as error:
            raise _load_error("lavis-blip", "captioner", model, error) from error
        logger.info("captioner lavis-blip %s on %s (%s)", model, torch_device, torch_dtype)
        return cls(blip, processor, decoding)

    def generate_kwargs(self, rows: int) -> dict[str, Any]:
        """`generate`'s settings for `rows` prompts: lengths count the prompt, as in LAVIS."""
        options = self.decoding
        tokenizer = self.model.tokenizer
        kwargs: dict[str, Any] = {
            "max_length": len(self.prompt_ids) + options.max_new_tokens,
            "min_length": len(self.prompt_ids) + options.min_new_tokens,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "repetition_penalty": options.repetition_penalty,
        }
        if self.bad_words_ids:
            kwargs["bad_words_ids"] = self.bad_words_ids
        if options.strategy == "sample":
            # LAVIS's own generate: K prompt rows per image, one sample each.
            return kwargs | {
                "do_sample": True,
                "top_p": options.top_p,
                "temperature": options.temperature,
                "num_beams": 1,
                "num_return_sequences": 1,
            }
        # Beam search: LAVIS's generate would run K identical searches (num_captions repeats
        # the rows); here one search per image returns its K best beams.
        return kwargs | {
            "do_sample": False,
            "num_beams": options.beam_width,
            "num_return_sequences": options.num_captions,
        }

    @torch.inference_mode()
    def token_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """K rows of token ids per image (prompt included), image after image."""
        k = self.decoding.num_captions
        image_embeds = self.model.forward_encoder({"image": pixels})  # once per image
        if self.decoding.strategy == "sample":
            rows_per_image, embed_copies = k, k
        else:
            beams = self.decoding.beam_width
            rows_per_image, embed_copies = 1, beams  # generate expands the prompt by beams
        # transformers 4.26's generate does not expand `encoder_hidden_states` itself.
        embeds = image_embeds.repeat_interleave(embed_copies, dim=0)
        prompt = torch.tensor([self.prompt_ids], device=pixels.device)
        prompt = prompt.repeat(pixels.shape[0] * rows_per_image, 1)
        try:
            return self.model.text_decoder.generate(
                input_ids=prompt,
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(
                    embeds.shape[:-1], dtype=torch.long, device=pixels.device
                ),
                **self.generate_kwargs(prompt.shape[0]),
            )
        finally:
            for projection in self.projections:
                projection.clear()

    def pixel_values(self, images: ModelImages) -> torch.Tensor:
        pictures = _pictures(images, "lavis-blip")
        batch = torch.stack([self.vis_processor(picture) for picture in pictures])
        return batch.to(self.model.device, next(self.model.parameters()).dtype)

    @torch.inference_mode()
    def caption(self, images: ModelImages) -> list[list[str]]:
        if not len(images):
            return []
        ids = self.token_ids(self.pixel_values(images))
        texts = self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return per_image(texts, len(images), self.prompt_text)


def _enable_decoder_cache(decoder: Any) -> None:
    """LAVIS 1.0.2's `BertLMHeadModel.prepare_inputs_for_generation` takes the cache as `past`,
    but transformers 4.26's `generate` passes it as `past_key_values`: it lands in **kwargs
    and is dropped, so every step reruns the decoder over the whole prefix. This instance's
    method takes either name (same token ids, up to float rounding; much less work)."""
    original = decoder.prepare_inputs_for_generation

    def prepare(input_ids: Any, past: Any = None, attention_mask: Any = None, **kwargs: Any):
        past = kwargs.pop("past_key_values", None) if past is None else past
        return original(input_ids, past=past, attention_mask=attention_mask, **kwargs)

    decoder.prepare_inputs_for_generation = prepare


class _ProjectOnce:
    """A cross-attention key or value projection that keeps its last result: LAVIS's decoder
    projects the same image embeddings again at every step of `generate` (med.py has no
    cross-attention cache), which is most of its work. The input is held, and compared by
    identity, so a result is only reused for that very tensor; `clear` drops both."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.project = linear.forward
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden is not self.input:
            self.input, self.output = hidden, self.project(hidden)
        return self.output  # type: ignore[return-value]

    def clear(self) -> None:
        self.input = self.output = None


def _project_image_once(decoder: Any) -> list[_ProjectOnce]:
    """Each cross-attention layer's key and value projections of the image, made once per
    `generate` call instead of once per step (same values; the module's weights and state
    dict are untouched: only the instances' `forward` is replaced)."""
    projections = []
    for layer in decoder.bert.encoder.layer:
        cross = getattr(layer, "crossattention", None)
        if cross is None:
            continue
        for linear in (cross.self.key, cross.self.value):
            projection = _ProjectOnce(linear)
            linear.forward = projection
            projections.append(projection)
    return projections


@register_captioner("lavis-blip")
class LavisBlipCaptionHandler(CaptionModelHandler):
    """RunInference handler for LAVIS's BLIP caption models; `model` is `TYPE[:WEIGHTS]` or
    `CONFIG.yaml[:WEIGHTS]` (module docstring)."""

    kind = "lavis-blip"
    default_model = BLIP_TYPES[0]

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        parse_reference(self.model_id, BLIP_TYPES[0])  # a malformed reference fails here

    @classmethod
    def check_model(cls, model: str, flag: str) -> str | None:
        return check_reference(model, BLIP_TYPES[0])

    def load_model(self) -> LavisBlipCaptioner:
        return LavisBlipCaptioner.load(
            self.model_id, decoding=self.decoding, device=self.device, dtype=self.dtype
        )


# ------------------------------------------------------------------------------------ CLIP


def clip_image_size(name: str) -> int:
    """The input size of LAVIS's CLIP architecture `name` (an error for an unknown one)."""
    from lavis.models.clip_models import model as clip_module

    configs = clip_module._MODEL_CONFIGS
    if name not in configs:
        raise ValueError(f"unknown CLIP type {name!r}: use one of {', '.join(configs)}")
    size = configs[name].get("vision_cfg", {}).get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def build_clip(name: str) -> tuple[Any, int]:
    """A LAVIS (open_clip) CLIP of architecture `name`, random weights, and its image size."""
    from lavis.models.clip_models import model as clip_module

    size = clip_image_size(name)
    return clip_module.create_model(name, pretrained=""), size


def clip_default_pretrained(name: str) -> tuple[Any, int]:
    """TYPE alone: LAVIS's own pretrained weights for it, as `load_model` would give them."""
    from lavis.models.clip_models import model as clip_module
    from lavis.models.clip_models.model import CLIP
    from omegaconf import OmegaConf

    size = clip_image_size(name)
    if name not in CLIP.PRETRAINED_MODEL_CONFIG_DICT:
        raise ValueError(f"LAVIS names no default weights for {name!r}: give TYPE:WEIGHTS")
    tag = OmegaConf.load(CLIP.default_config_path(name)).model.pretrained
    return clip_module.create_model(name, pretrained=tag), size


class LavisClipRanker:
    """A loaded LAVIS CLIP: each image embedded once, all candidates in one text batch.
    `score` is the cosine of the normalised projected embeddings (what LAVIS's
    `extract_features` gives as `*_embeds_proj`); `probability` the softmax of the scaled
    cosines among one image's candidates."""

    def __init__(self, model: Any, image_size: int) -> None:
        from lavis.processors.clip_processors import ClipImageEvalProcessor

        self.model = model.eval()
        self.vis_processor = ClipImageEvalProcessor(image_size=image_size)
        self.context_length = int(getattr(model, "context_length", 77))

    @classmethod
    def load(cls, model: str, *, device: str = "auto", dtype: str = "auto") -> LavisClipRanker:
        _import_lavis()
        try:
            torch_device = resolve_device(device, model_id=f"lavis-clip:{model}")
            torch_dtype = resolve_dtype(dtype, torch_device)
            allow_tf32(torch_device, torch_dtype)
            reference = parse_reference(model, "ViT-B-32")
            if reference.is_yaml:
                raise ValueError("lavis-clip takes TYPE[:WEIGHTS], not a yaml config")
            if reference.weights is None:
                clip, image_size = clip_default_pretrained(reference.config)
            else:
                clip, image_size = build_clip(reference.config)
            if reference.weights == RANDOM:
                logger.warning("lavis-clip %s: random weights, its scores are noise", model)
            elif reference.weights is not None:
                apply_state_dict(clip, read_state_dict(reference.weights), reference.weights)
            clip = clip.to(torch_device, torch_dtype)
        except ModelLoadError:
            raise
        except Exception as error:
            raise _load_error("lavis-clip", "ranker", model, error) from error
        logger.info("ranker lavis-clip %s on %s (%s)", model, torch_device, torch_dtype)
        return cls(clip, image_size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """LAVIS's tokenizer, except that a text cut at the context length keeps its end token
        (LAVIS's cuts it off, and CLIP reads the embedding at the end token)."""
        from lavis.models.clip_models.tokenizer import _tokenizer, tokenize

        tokens = tokenize(list(texts), context_length=self.context_length)
        end = _tokenizer.encoder["<end_of_text>"]
        cut = (tokens[:, -1] != 0) & (tokens[:, -1] != end)
        tokens[cut, -1] = end
        return tokens

    @torch.inference_mode()
    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        texts = [text for group in candidates for text in group]
        if not texts:
            return [[] for _ in candidates]
        model = self.model
        device, dtype = model.logit_scale.device, model.logit_scale.dtype
        pictures = _pictures(images, "lavis-clip")
        pixels = torch.stack([self.vis_processor(p) for p in pictures]).to(device, dtype)
        image_embeds = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        text_embeds = model.encode_text(self.tokenize(texts).to(device))
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        counts = torch.tensor([len(group) for group in candidates], device=device)
        cosine = (text_embeds * image_embeds.repeat_interleave(counts, dim=0)).sum(dim=-1)
        logits = cosine * model.logit_scale.exp().float()
        return best_first(candidates, cosine, logits)


@register_ranker("lavis-clip")
class LavisClipRankHandler(RankModelHandler):
    """RunInference handler for LAVIS's CLIP (`clip_feature_extractor`); `model` is
    `TYPE[:WEIGHTS]` (module docstring)."""

    kind = "lavis-clip"
    default_model = "ViT-B-32"

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        parse_reference(self.model_id, "ViT-B-32")

    @classmethod
    def check_model(cls, model: str, flag: str) -> str | None:
        return check_reference(model, "ViT-B-32")

    def load_model(self) -> LavisClipRanker:
        return LavisClipRanker.load(self.model_id, device=self.device, dtype=self.dtype)
