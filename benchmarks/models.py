"""Random-weight BLIP-base and CLIP-B/32 of the real architectures (or fewer layers), saved like
hub checkouts: honest compute costs without downloading weights."""

from __future__ import annotations

import os

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)


def _depth(config: object, layers: int | None) -> None:
    if layers is not None:
        config.num_hidden_layers = layers


def build_blip_base(directory: str, layers: int | None = None) -> str:
    """blip-image-captioning-base: ViT-B/16 at 384 px, BERT-base decoder (224M parameters)."""
    config, processor = _blip_base_parts(layers)
    torch.manual_seed(0)
    _save(directory, BlipForConditionalGeneration(config), processor)
    return directory


def build_blip_itm_base(directory: str, layers: int | None = None) -> str:
    """blip-itm-base-coco: ViT-B/16 at 384 px, BERT-base text encoder with cross-attention and
    the matching head."""
    config, processor = _blip_base_parts(layers)
    torch.manual_seed(0)
    _save(directory, BlipForImageTextRetrieval(config), processor)
    return directory


def _blip_base_parts(layers: int | None) -> tuple[BlipConfig, BlipProcessor]:
    config = BlipConfig()
    _depth(config.vision_config, layers)
    _depth(config.text_config, layers)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words = [f"w{i}" for i in range(config.text_config.vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = BertTokenizer(
        vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"], model_max_length=512
    )
    config.text_config.pad_token_id = vocab["[PAD]"]
    config.text_config.bos_token_id = vocab["[DEC]"]
    config.text_config.eos_token_id = config.text_config.sep_token_id = vocab["[SEP]"]
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
        tokenizer=tokenizer,
    )
    return config, processor


def build_siglip_base(directory: str, layers: int | None = None) -> str:
    """siglip-base-patch16-224: ViT-B/16 at 224 px and a 12-layer text encoder over 64 tokens
    (203M); a word-piece tokenizer of its vocabulary's size stands in for its SentencePiece."""
    config = SiglipConfig()
    _depth(config.vision_config, layers)
    _depth(config.text_config, layers)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(config.text_config.vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    config.text_config.pad_token_id = vocab["[PAD]"]
    config.text_config.bos_token_id = vocab["[CLS]"]
    config.text_config.eos_token_id = vocab["[SEP]"]
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 224, "width": 224}),
        tokenizer=BertTokenizer(vocab=vocab, model_max_length=64),
    )
    torch.manual_seed(0)
    _save(directory, SiglipModel(config), processor)
    return directory


def build_clip_b32(directory: str, layers: int | None = None) -> str:
    """clip-vit-base-patch32: ViT-B/32 at 224 px and a 12-layer text encoder (151M)."""
    config = CLIPConfig()
    _depth(config.vision_config, layers)
    _depth(config.text_config, layers)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    base = specials + letters + [c + "</w>" for c in letters] + [f"w{i}</w>" for i in range(10)]
    filler = [f"x{i}" for i in range(config.text_config.vocab_size - len(base))]
    vocab = {token: i for i, token in enumerate(base + filler)}
    config.text_config.bos_token_id = vocab["<|startoftext|>"]
    config.text_config.eos_token_id = config.text_config.pad_token_id = vocab["<|endoftext|>"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
    )
    torch.manual_seed(0)
    _save(directory, CLIPModel(config), processor)
    return directory


def _save(directory: str, model: object, processor: object) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
