"""Tiny Stable-Diffusion-shaped pipelines built offline, for tests and examples.

Model hubs cannot be reached here, so tests build a real diffusers
StableDiffusionPipeline from small configs (in the manner of diffusers'
`get_dummy_components`) with a CLIP tokenizer whose files are written locally,
save it with `save_pretrained` and load it back through `from_pretrained`.
`load_script` imports a benchmark or script (not a package module) by its path.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch

# A small word vocabulary on top of CLIP's byte-level alphabet, so common prompt
# words are single tokens and rare tokens ("sks") still tokenize (by characters).
WORDS = tuple(
    "a photo of sks zwx qvt dog cat backpack toy red green blue yellow white black "
    "on in the with and background star circle square triangle top bottom left right "
    "center small large".split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (openai/CLIP simple_tokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer_files(
    folder: str | Path, words: tuple[str, ...] | list[str] = WORDS, max_length: int = 77
) -> Path:
    """Write vocab.json, merges.txt and configs of a CLIP BPE tokenizer to `folder`.

    Every byte (alone and word-final) is in the vocabulary, and the merges spell out
    each word of `words`, so any text tokenizes and listed words are one token each.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = [*list(word[:-1]), word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_components(
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """The components of a tiny StableDiffusionPipeline (random weights, seeded).

    The VAE downsamples by 2 per extra block, so 16 px images give 8 px latents with
    the default two VAE blocks.
    """
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    if tokenizer_dir is None:
        raise ValueError("tiny_components needs tokenizer_dir (see write_clip_tokenizer_files)")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = _tiny_unet(block_out_channels, cross_attention_dim, sample_size)
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    torch.manual_seed(seed)
    text_encoder = _tiny_text_encoder(tokenizer, cross_attention_dim)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def _tiny_unet(block_out_channels: tuple[int, ...], cross_attention_dim: int, sample_size: int):
    """A UNet2DConditionModel with one resnet per level, cross-attention below the top."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 8, 8)[: len(block_out_channels)],
        norm_num_groups=min(32, block_out_channels[0]),
    )


def _tiny_vae(sample_size: int):
    """A two-block AutoencoderKL: (B, 3, 2s, 2s) images <-> (B, 4, s, s) latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size * 2,
    )


def _tiny_text_encoder(tokenizer, hidden_size: int):
    """A two-layer CLIPTextModel over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
    )
    return CLIPTextModel(text_config)


def save_tiny_pipeline(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny pipeline, save it with `save_pretrained` to `path`, return `path`."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    tokenizer_dir = write_clip_tokenizer_files(path / "_tokenizer_src")
    pipe = StableDiffusionPipeline(
        **tiny_components(seed, tokenizer_dir=tokenizer_dir, **kwargs),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def write_reference_checkpoint(float_dir: str | Path, path: str | Path, num_experts: int = 2,
                               seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint in the layout of the authors' released implementation
    (tuneqdm/reference_import.py), made from the float UNet at `float_dir`: 8-bit
    asymmetric integers, zero points (out, 1[, 1, 1]), per-expert scales perturbed by
    5 % around (s0, 1): delta_out (N, out, 1[, 1, 1]), delta_in (N, 1, in[, 1, 1]).
    Returns its delta_state."""
    from torch import nn

    from .base import load_float_pipeline
    from .config import QuantConfig
    from .quant import quantize_weight

    unet = load_float_pipeline(float_dir).unet
    config = QuantConfig(bits=8, num_experts=num_experts)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        q, zero, scale0 = quantize_weight(module.weight, config)
        out, inp = module.weight.shape[:2]
        tail = (1, 1) if isinstance(module, nn.Conv2d) else ()
        noise_out = torch.randn(num_experts, out, generator=generator)
        noise_in = torch.randn(num_experts, inp, generator=generator)
        state[f"{name}.weight_int"] = q
        state[f"{name}.zero_point"] = zero.view(out, 1, *tail)
        state[f"{name}.delta_out_experts"] = (scale0.view(1, out) * (1 + 0.05 * noise_out)
                                              ).view(num_experts, out, 1, *tail)
        state[f"{name}.delta_in_experts"] = (1 + 0.05 * noise_in).view(num_experts, 1, inp,
                                                                       *tail)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().clone()
    reference_config = {"n_bits": 8, "symmetric": False, "num_experts": num_experts,
                        "total_denoising_steps": 1000, "train_delta_in": True,
                        "train_bias": False}
    torch.save({"delta_state": state, "config": reference_config}, str(path))
    return state


def load_script(path: str | Path) -> ModuleType:
    """Import a script that is not in a package (benchmarks/*.py, scripts/*.py) by its
    path, as a module named after its file, so that tests can call its functions."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
