"""Embedding metrics of generated images (real models only): DINO, CLIP-I, CLIP-T.

`DinoScorer` and `ClipScorer` follow DreamBooth's definitions
(Ruiz et al. 2023, section 4.1; used by TuneQDM's table): cosine similarities of ViT CLS
embeddings (DINO) or CLIP image embeddings (CLIP-I) between a generated image and the
subject's real images (mean over the real images), and of CLIP image and prompt
embeddings (CLIP-T). Models come from local paths; on these machines only tiny random
ones exist, so these numbers mean something only with real weights.

Pixel-level fidelity against the toy world's exact ground truth is metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _as_pil(images) -> list:
    """PIL RGB images at their own size (no resizing: real models have their own)."""
    from PIL import Image

    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
            continue
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        out.append(Image.fromarray(array))
    return out


def _normalise(features) -> np.ndarray:
    import torch

    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


class DinoScorer:
    """DINO: cosine similarity of ViT CLS embeddings (DreamBooth uses ViT-S/16 DINO).

    `model_path`: a local folder holding a transformers ViT-like model (AutoModel) and
    its image processor.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(str(model_path))
        self.model = AutoModel.from_pretrained(str(model_path)).to(self.device).eval()

    def embed(self, images: Sequence) -> np.ndarray:
        """(N, D) float32 unit CLS embeddings."""
        import torch

        inputs = self.processor(images=_as_pil(images), return_tensors="pt").to(self.device)
        with torch.no_grad():
            hidden = self.model(**inputs).last_hidden_state  # (N, tokens, D)
        return _normalise(hidden[:, 0])

    def similarity(self, generated: Sequence, references: Sequence) -> np.ndarray:
        """(N,) per generated image: mean cosine to the reference (real) images."""
        return (self.embed(generated) @ self.embed(references).T).mean(axis=1)


class ClipScorer:
    """CLIP-I (image-image) and CLIP-T (image-prompt) cosine similarities.

    `model_path`: a local folder holding a transformers CLIPModel with its processor
    (image processor and tokenizer).
    """

    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.processor = CLIPProcessor.from_pretrained(str(model_path))
        self.model = CLIPModel.from_pretrained(str(model_path)).to(self.device).eval()

    def embed_images(self, images: Sequence) -> np.ndarray:
        """(N, P) float32 unit image embeddings."""
        import torch

        inputs = self.processor(images=_as_pil(images), return_tensors="pt").to(self.device)
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        return _normalise(getattr(features, "pooler_output", features))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, P) float32 unit text embeddings."""
        import torch

        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        with torch.no_grad():
            features = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"])
        return _normalise(getattr(features, "pooler_output", features))

    def image_similarity(self, generated: Sequence, references: Sequence) -> np.ndarray:
        """CLIP-I, (N,): per generated image, mean cosine to the reference images."""
        return (self.embed_images(generated) @ self.embed_images(references).T).mean(axis=1)

    def text_similarity(self, generated: Sequence, prompts: Sequence[str]) -> np.ndarray:
        """CLIP-T, (N,): cosine of each image with its own prompt. DreamBooth scores the
        prompt without the rare token; pass prompts accordingly."""
        if len(generated) != len(prompts):
            raise ValueError(f"{len(generated)} images but {len(prompts)} prompts")
        return (self.embed_images(generated) * self.embed_texts(prompts)).sum(axis=1)
