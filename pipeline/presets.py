"""The `tiny` preset: seeded random checkpoints in the real layouts, small enough for CPU tests and demos."""

from __future__ import annotations

import json
import os

# Bump when any tiny architecture or seed changes, so node caches rebuild instead of serving stale weights.
TINY_VERSION = "2"

TEXT_WIDTH = 32  # CLIP text hidden size = prior embedding dim in the tiny models
MAX_TOKENS = 77  # as real CLIP, so prompt truncation behaves as with real checkpoints


def _byte_alphabet() -> list[str]:
    # CLIP's byte-level BPE maps every byte to a printable unicode character; the vocab is built on that alphabet.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_tokenizer(directory: str) -> None:
    """A CLIP BPE tokenizer with a small real vocabulary: bytes, word-final bytes and letter-pair merges."""
    os.makedirs(directory, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [(a, b) for a in letters for b in letters] + [(a, b + "</w>") for a in letters for b in letters]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump(special, fh)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True,
                   **special}, fh)


def _tokenizer(directory: str):
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory)


def _text_config(tokenizer, hidden: int, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, projection_dim=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8, projection_dim=TEXT_WIDTH)


def _tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def build_tiny_image_encoder(directory: str) -> None:
    """Karlo image-variations parts: a CLIPVisionModelWithProjection whose projection matches the text
    projection (so its embeddings decode), and its CLIPImageProcessor."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(6)
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(os.path.join(directory, "image_encoder"),
                                                                          safe_serialization=True)
    _tiny_image_processor().save_pretrained(os.path.join(directory, "feature_extractor"))


def build_tiny_unclip(directory: str) -> None:
    """Karlo layout: text encoder, prior, text_proj, 16px decoder, 64px super-res pair, three UnCLIP schedulers;
    plus the image-variations snapshot's image encoder and feature extractor, so one folder serves every mode."""
    import torch
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = _tokenizer(os.path.join(directory, "tokenizer"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, TEXT_WIDTH, layers=2))
    torch.manual_seed(1)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=TEXT_WIDTH,
                             num_embeddings=MAX_TOKENS, additional_embeddings=4)
    with torch.no_grad():
        # A random prior has clip_std = 0, which would collapse every image embedding to clip_mean.
        prior.clip_std.fill_(1.0)
    block = 32
    torch.manual_seed(2)
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=TEXT_WIDTH,
                                    time_embed_dim=4 * block, cross_attention_dim=64)
    torch.manual_seed(3)
    decoder = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(block, 2 * block),
        cross_attention_dim=64, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    super_res = dict(sample_size=64, in_channels=6, out_channels=3, layers_per_block=1,
                     down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                     up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
                     block_out_channels=(block, 2 * block))
    torch.manual_seed(4)
    super_res_first = UNet2DModel(**super_res)
    torch.manual_seed(5)
    super_res_last = UNet2DModel(**super_res)
    # Scheduler settings as in the Karlo snapshot.
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
        super_res_first=super_res_first, super_res_last=super_res_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample=True, clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                          clip_sample=True, clip_sample_range=1.0),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                            clip_sample=True, clip_sample_range=1.0),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(os.path.join(directory, "tokenizer"))  # keep vocab.json/merges.txt as Karlo ships them
    build_tiny_image_encoder(directory)


def build_tiny_upsampler_1024(directory: str) -> None:
    """x4 upscaler layout: VAE (x4), 7-channel UNet with noise-level classes, CLIP text encoder, DDIM + DDPM."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    tokenizer = _tokenizer(os.path.join(directory, "tokenizer"))
    torch.manual_seed(10)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_WIDTH, layers=2))
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        # Attention only at the lowest resolution keeps 64x64 latents cheap on a CPU.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8, cross_attention_dim=TEXT_WIDTH, use_linear_projection=True, num_class_embeds=1000,
    )
    torch.manual_seed(12)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.08333,
    )
    # Scheduler settings as in the stable-diffusion-x4-upscaler snapshot.
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    low_res_scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                      clip_sample=False, variance_type="fixed_small")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res_scheduler, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, watermarker=None,
                                          max_noise_level=350)
    pipe.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(os.path.join(directory, "tokenizer"))


def build_tiny_clip(directory: str) -> None:
    """CLIPModel layout: text + vision towers, tokenizer and image processor in one directory."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _tokenizer(directory)
    text = _text_config(tokenizer, TEXT_WIDTH, layers=2)
    vision = _tiny_vision_config()
    torch.manual_seed(20)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_WIDTH))
    model.save_pretrained(directory, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=_tiny_image_processor(),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(directory)
    write_tiny_tokenizer(directory)


TINY_BUILDERS = {
    "unclip": build_tiny_unclip,
    "upsampler_1024": build_tiny_upsampler_1024,
    "clip": build_tiny_clip,
}
