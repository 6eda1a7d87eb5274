"""Training data prepared once: VAE latents and text embeddings of fixed prompts.

DreamBooth (Ruiz et al., 2023) data for one or several subjects, each with a handful
of instance images and an instance prompt ("a photo of sks dog"), plus optional class
images for prior preservation. Everything the UNet needs is computed up front, so
the VAE and text encoder can leave memory before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MIN_SIDE, is_image_name, load_image

PROMPT_FIELDS = ("token", "class_noun")


class TrainingError(ValueError):
    """Training could not go on: non-finite loss, or unusable data."""


@dataclass
class Subject:
    """One subject to personalise.

    prompt: template with {token} and {class_noun}, e.g. "a photo of {token} {class_noun}".
    captions: optional per-image templates, one per image, each used instead of
        `prompt` for its image (None: `prompt`), e.g. "a {token} {class_noun} on a
        green floor, top left": what a caption says about an image's context
        (background, position) the token does not have to explain, so the token binds
        to the subject alone (docs/toyworld.md "Recipe").
    """

    subject_id: str
    images: list[Image.Image]
    class_noun: str
    token: str = "sks"
    prompt: str = "a photo of {token} {class_noun}"
    class_prompt: str = "a photo of {class_noun}"
    captions: list[str | None] | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"subject {self.subject_id!r} has no images")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"subject {self.subject_id!r}: {len(self.captions)} captions for "
                             f"{len(self.images)} images; give one caption per image or none")
        for template in (self.prompt, self.class_prompt, *filter(None, self.captions or [])):
            try:
                template.format(token=self.token, class_noun=self.class_noun)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"subject {self.subject_id!r}: prompt template {template!r} is invalid "
                    f"({err}); allowed placeholders: {{token}}, {{class_noun}}"
                ) from None

    @property
    def instance_prompt(self) -> str:
        return self.prompt.format(token=self.token, class_noun=self.class_noun)

    @property
    def image_prompts(self) -> list[str]:
        """The prompt of each image: its caption, else the instance prompt."""
        templates = self.captions or [None] * len(self.images)
        return [(t or self.prompt).format(token=self.token, class_noun=self.class_noun)
                for t in templates]

    @property
    def class_prompt_text(self) -> str:
        return self.class_prompt.format(token=self.token, class_noun=self.class_noun)

    def describe(self) -> dict[str, str]:
        return {
            "subject_id": self.subject_id,
            "token": self.token,
            "class_noun": self.class_noun,
            "prompt": self.instance_prompt,
        }


@dataclass
class TrainingData:
    """Cached tensors for the UNet loop.

    latent_mean, latent_std: (M, 4, h, w) VAE posterior of every image (already
    multiplied by the VAE scaling factor); embeddings: (P, L, D) prompt embeddings;
    prompt_of: (M,) index into embeddings; subject_of: (M,) subject index;
    is_class: (M,) bool, prior-preservation images.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    embeddings: torch.Tensor
    prompt_of: torch.Tensor
    subject_of: torch.Tensor
    is_class: torch.Tensor
    subjects: list[dict[str, str]] = field(default_factory=list)

    @property
    def instance_indices(self) -> list[torch.Tensor]:
        """Per subject, the indices of its instance images."""
        return [
            torch.nonzero((self.subject_of == s) & ~self.is_class).flatten()
            for s in range(len(self.subjects))
        ]

    @property
    def class_indices(self) -> torch.Tensor:
        return torch.nonzero(self.is_class).flatten()


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, r, r) in [-1, 1]: resize the short side, centre crop."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (r, r, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) text-encoder hidden states of `prompts`."""
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    )
    encoder = pipe.text_encoder
    return encoder(tokens.input_ids.to(encoder.device))[0].float().cpu()


@torch.no_grad()
def encode_images(
    pipe, images: list[Image.Image], resolution: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std, (M, 4, r/8, r/8) each, times the scaling factor."""
    vae = pipe.vae
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack(
            [image_to_tensor(im, resolution) for im in images[start : start + batch_size]]
        )
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    factor = vae.config.scaling_factor
    return torch.cat(means) * factor, torch.cat(stds) * factor


def prepare_data(
    pipe,
    subjects: list[Subject],
    resolution: int,
    class_images: list[list[Image.Image]] | None = None,
) -> TrainingData:
    """Encode every instance (and class) image and every prompt once.

    class_images: per subject, its prior-preservation images (or None).
    """
    images: list[Image.Image] = []
    prompts: list[str] = []
    prompt_of, subject_of, is_class = [], [], []
    for index, subject in enumerate(subjects):
        groups = [(subject.images, subject.image_prompts, False)]
        if class_images is not None and class_images[index]:
            groups.append((class_images[index],
                           [subject.class_prompt_text] * len(class_images[index]), True))
        for group_images, group_prompts, cls in groups:
            for prompt in group_prompts:
                if prompt not in prompts:
                    prompts.append(prompt)
                prompt_of.append(prompts.index(prompt))
            images.extend(group_images)
            subject_of += [index] * len(group_images)
            is_class += [cls] * len(group_images)
    mean, std = encode_images(pipe, images, resolution)
    return TrainingData(
        latent_mean=mean,
        latent_std=std,
        embeddings=encode_prompts(pipe, prompts),
        prompt_of=torch.tensor(prompt_of),
        subject_of=torch.tensor(subject_of),
        is_class=torch.tensor(is_class),
        subjects=[s.describe() for s in subjects],
    )


def load_image_folder(folder: str | Path, min_side: int = DEFAULT_MIN_SIDE) -> list[Image.Image]:
    """Every image file of a folder, sorted by name, as upright RGB (images.load_image:
    EXIF rotation, transparency on white, odd modes; bad or smaller than `min_side`
    pixels raise ImageLoadError)."""
    return [load_image(p, min_side=min_side) for p in _image_paths(folder)]


def load_captions(folder: str | Path) -> list[str | None] | None:
    """The sidecar caption of each image of load_image_folder(folder), in its order:
    the stripped text of `<image stem>.txt` beside it (a prompt template, e.g. "a
    {token} {class_noun} on a beach"), None for an image without one; None when no
    image has one (Subject.captions)."""
    captions = []
    for path in _image_paths(folder):
        sidecar = path.with_suffix(".txt")
        captions.append(sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file()
                        else None)
    return captions if any(captions) else None


def _image_paths(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_image_name(p.name))


def class_images(pipe, subjects: list[Subject], config, resolution: int) -> list[list] | None:
    """Per subject, its prior-preservation images (PIL, `resolution` px): from a folder,
    or generated by the (untuned) pipeline once and cached as PNGs. `config`: a
    tuneqdm.train.TrainConfig."""
    if not config.prior_preservation:
        return None
    if config.class_images_dir:
        images = load_image_folder(config.class_images_dir)
        if not images:
            raise TrainingError(f"class_images_dir {config.class_images_dir} has no images")
        return [images for _ in subjects]
    from .generate import generate
    from .model import quantized_layers, reset_scales

    result = []
    for subject in subjects:
        cache = None
        if config.class_images_cache:
            slug = "".join(c if c.isalnum() else "_" for c in subject.class_prompt_text)
            cache = Path(config.class_images_cache) / f"{slug}_{resolution}px"
            if cache.is_dir():
                cached = load_image_folder(cache, min_side=1)  # our own, any size
                if len(cached) >= config.num_class_images:
                    result.append(cached[: config.num_class_images])
                    continue
        if quantized_layers(pipe.unet):
            reset_scales(pipe.unet)
        images = generate(
            pipe,
            [subject.class_prompt_text] * config.num_class_images,
            seed=[config.seed + i for i in range(config.num_class_images)],
            num_inference_steps=config.class_image_steps,
            height=resolution,
            width=resolution,
        )
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(cache / f"{i:04d}.png")
        result.append(images)
    return result
