"""Tiny random BLIP and CLIP models, built offline, saved like any hub checkout.

They exercise the real loading and inference code (`from_pretrained` of a directory, real
tokenizers and processors) in tests and in `make demo`. Their captions are noise.
"""

from __future__ import annotations

import os

WORDS = (
    "a picture of the an and with on in at near dog cat man woman child tree house car road "
    "sky sea beach mountain river field flower bird horse boat bridge city street table cup "
    "red blue green white black small large old young sitting standing running walking two "
    "three some people building window door grass snow water light dark sunny cloudy"
).split()


SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
}


def build_tiny_blip(directory: str, image_size: int = 32, vision_width: int = 32) -> str:
    """A ~60k-parameter BLIP captioner with a real BERT tokenizer and BLIP processor; with
    `image_size` 384, BLIP-base's input size at next to no compute. A `vision_width` wider
    than the text decoder's 32 is BLIP-large's shape (a ViT-L of 1024 for a 768 decoder)."""
    from transformers import BlipForConditionalGeneration

    config, processor = _tiny_blip_parts(image_size, vision_width)
    _save(directory, BlipForConditionalGeneration(config), processor)
    return directory


def build_tiny_blip_itm(directory: str, image_size: int = 32) -> str:
    """A tiny BLIP image-text matching model (`BlipForImageTextRetrieval`, the `blip-itm`
    ranker), with the same tokenizer and processor as `build_tiny_blip`."""
    from transformers import BlipForImageTextRetrieval

    config, processor = _tiny_blip_parts(image_size)
    _save(directory, BlipForImageTextRetrieval(config), processor)
    return directory


def _tiny_blip_parts(image_size: int, vision_width: int = 32) -> tuple[object, object]:
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessorPil, BlipProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    tokenizer = BertTokenizer(
        vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"], model_max_length=64
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    config = BlipConfig(
        vision_config=SMALL
        | {"image_size": image_size, "patch_size": _patch(image_size), "hidden_size": vision_width},
        text_config=SMALL
        | {
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "pad_token_id": vocab["[PAD]"],
            "bos_token_id": vocab["[DEC]"],
            "eos_token_id": vocab["[SEP]"],
            "sep_token_id": vocab["[SEP]"],
        },
        projection_dim=32,
    )
    return config, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_clip(directory: str, image_size: int = 32) -> str:
    """A ~50k-parameter CLIP ranker with a real byte-level BPE tokenizer and CLIP processor;
    `image_size` is its crop (224 for CLIP-B/32's input)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab_tokens = specials + letters + [c + "</w>" for c in letters] + ["!", ".", ",", "'"]
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        vision_config=SMALL | {"image_size": image_size, "patch_size": _patch(image_size)},
        text_config=SMALL
        | {
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        projection_dim=16,
    )
    model = CLIPModel(config)
    _save(directory, model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer))
    return directory


def build_tiny_siglip(directory: str, image_size: int = 32) -> str:
    """A tiny SigLIP ranker: the real model and image processor, with a BERT word-piece
    tokenizer standing in for SigLIP's SentencePiece one (which needs a trained model file)."""
    from transformers import (
        BertTokenizer,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
        SiglipProcessor,
    )

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=16)
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    config = SiglipConfig(
        vision_config=SMALL | {"image_size": image_size, "patch_size": _patch(image_size)},
        text_config=SMALL
        | {
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "pad_token_id": vocab["[PAD]"],
            "bos_token_id": vocab["[CLS]"],
            "eos_token_id": vocab["[SEP]"],
        },
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    _save(directory, SiglipModel(config), processor)
    return directory


def build_tiny_siglip2(directory: str) -> str:
    """A tiny SigLIP 2 NaFlex ranker (`Siglip2Model`: variable resolution, up to 16 patches of
    8 pixels, images kept at their aspect), with a BERT word-piece tokenizer standing in."""
    from transformers import (
        BertTokenizer,
        Siglip2Config,
        Siglip2ImageProcessorPil,
        Siglip2Model,
        Siglip2Processor,
    )

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=16)
    image_processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    config = Siglip2Config(
        vision_config=SMALL | {"patch_size": 8, "num_patches": 16},
        text_config=SMALL
        | {
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "pad_token_id": vocab["[PAD]"],
            "bos_token_id": vocab["[CLS]"],
            "eos_token_id": vocab["[SEP]"],
        },
    )
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    _save(directory, Siglip2Model(config), processor)
    return directory


def build_tiny_blip2(directory: str, image_size: int = 32, language: str = "opt") -> str:
    """A tiny BLIP-2 (`Blip2ForConditionalGeneration`: vision tower, Q-Former with 4 query
    tokens, and an OPT decoder or, with `language="t5"`, a Flan-T5-style encoder-decoder),
    with a byte-level BPE (OPT) or Unigram (T5) tokenizer and BLIP-2's processor."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    tokenizer, text = _opt_parts() if language == "opt" else _t5_parts()
    config = Blip2Config(
        vision_config=SMALL | {"image_size": image_size, "patch_size": _patch(image_size)},
        qformer_config=SMALL | {"encoder_hidden_size": 32, "vocab_size": 64},
        text_config=text,
        num_query_tokens=4,
        image_token_index=text["vocab_size"] - 1,
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4
    )
    _save(directory, Blip2ForConditionalGeneration(config), processor)
    return directory


def _opt_parts() -> tuple[object, dict]:
    """An OPT decoder's tokenizer and config; `<image>` is the last token."""
    from transformers import GPT2TokenizerFast, OPTConfig

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<pad>", "</s>", "<unk>", *letters, *("\u0120" + c for c in letters), "\u0120"]
    vocab = {token: i for i, token in enumerate([*tokens, "<image>"])}
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>"
    )
    text = OPTConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        ffn_dim=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["</s>"],
        eos_token_id=vocab["</s>"],
    )
    return tokenizer, text.to_dict()


def _t5_parts() -> tuple[object, dict]:
    """A T5 encoder-decoder's Unigram tokenizer and config; `<image>`, which BLIP-2's
    processor adds, is the last token."""
    from transformers import T5Config, T5TokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    text = T5Config(
        vocab_size=len(pieces) + 1,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, text.to_dict()


def build_tiny_florence2(directory: str, image_size: int = 64) -> str:
    """A tiny Florence-2 (`Florence2ForConditionalGeneration`: a 4-stage DaViT vision tower,
    a BART encoder-decoder) with a byte-level BPE tokenizer and Florence-2's processor; its
    image becomes (image_size / 32)^2 + 1 tokens."""
    from transformers import (
        BartConfig,
        BartTokenizerFast,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    tokens = [*specials, *letters, *("\u0120" + c for c in letters), "\u0120", "?", "."]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = BartTokenizerFast(
        vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"}
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False
    )
    image_processor.image_seq_length = (image_size // 32) ** 2 + 1
    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1),
        embed_dim=(8, 16, 32, 32),
        num_heads=(1, 1, 2, 2),
        num_groups=(1, 1, 2, 2),
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["</s>"],
        forced_bos_token_id=vocab["<s>"],
    )
    config = Florence2Config(
        vision_config=vision, text_config=text, image_token_id=vocab["<image>"]
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    _save(directory, Florence2ForConditionalGeneration(config), processor)
    return directory


def build_tiny_llava(directory: str, image_size: int = 32) -> str:
    """A tiny LLaVA (`LlavaForConditionalGeneration`: a CLIP vision tower and a Llama language
    model), loaded by `AutoModelForImageTextToText`, with a byte-level BPE tokenizer, LLaVA's
    processor and a chat template in LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" form."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GPT2TokenizerFast,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tokens = [*specials, *letters, *("\u0120" + c for c in letters), "\u0120", "\u010a", ":", "."]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = GPT2TokenizerFast(
        vocab=vocab,
        merges=[],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for message in messages %}{{ message['role'].upper() }}: "
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
        "{% else %}{{ content['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=_patch(image_size),
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        **SMALL, image_size=image_size, patch_size=_patch(image_size), projection_dim=32
    )
    text = LlamaConfig(
        **SMALL,
        vocab_size=len(vocab),
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    _save(directory, LlavaForConditionalGeneration(config), processor)
    return directory


def build_tiny_paligemma(directory: str, image_size: int = 32) -> str:
    """A tiny PaliGemma (`PaliGemmaForConditionalGeneration`: a SigLIP vision tower and a Gemma
    language model with prefix attention), loaded by `AutoModelForImageTextToText`; its
    processor has no chat template (prompts such as "caption en")."""
    from transformers import (
        GemmaConfig,
        GemmaTokenizerFast,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    tokens = [*specials, *letters, *("\u2581" + c for c in letters), "\u2581", "\n"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = GemmaTokenizerFast(
        vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"}
    )
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // _patch(image_size)) ** 2
    vision = SiglipVisionConfig(
        **SMALL, image_size=image_size, patch_size=_patch(image_size), projection_dim=32
    )
    text = GemmaConfig(
        **SMALL,
        vocab_size=len(vocab),
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        projection_dim=32,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    _save(directory, PaliGemmaForConditionalGeneration(config), processor)
    return directory


def build_tiny_models(directory: str) -> tuple[str, str]:
    """Both tiny models under `directory`: `(blip_dir, clip_dir)`."""
    import torch

    torch.manual_seed(0)
    blip = build_tiny_blip(os.path.join(directory, "tiny-blip"))
    clip = build_tiny_clip(os.path.join(directory, "tiny-clip"))
    return blip, clip


def _patch(image_size: int) -> int:
    """Patches of 8 pixels at 32 px: 4x4 of them, at any input size (next to no compute)."""
    return max(8, image_size // 4)


def _save(directory: str, model: object, processor: object) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[attr-defined]
    processor.save_pretrained(directory)  # type: ignore[attr-defined]
