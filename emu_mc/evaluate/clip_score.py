"""Text-to-image CLIP score from a local CLIP: no downloads at run time.

CLIP score (Hessel et al., 2021, as torchmetrics reports it): 100 * max(cos(image, caption), 0) averaged
over the generated images, with image and text embeddings from a local Hugging Face `CLIPModel`
directory (`--clip DIR`, e.g. openai/clip-vit-large-patch14 saved with save_pretrained: config, weights
and the tokenizer files). Images are resized (bicubic, shorter side) and centre-cropped to the model's
image size and normalised with CLIP's mean and std; captions are cut to the model's 77 positions.
"""
import os
from typing import List, Tuple

import numpy as np
import torch

from emu_mc.inference.settings import GenerationInputError


def check_clip_dir(path: str) -> None:
    """GenerationInputError unless `path` is a directory (checked before any generation runs)."""
    if not os.path.isdir(path):
        raise GenerationInputError(f"--clip {path}: not a directory (a local Hugging Face CLIPModel directory is "
                                   "needed for the CLIP score; nothing is downloaded at run time)")


def load_clip(path: str, device: torch.device) -> Tuple[object, object, object]:
    """(model, tokenizer, image processor) from a local CLIPModel directory, eval mode on `device`."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    check_clip_dir(path)
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise GenerationInputError(f"--clip {path}: not a CLIPModel directory with its tokenizer "
                                   f"({str(err).splitlines()[0]})") from None
    size = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, tokenizer, processor


@torch.no_grad()
def clip_score(clip: Tuple[object, object, object], images: List[np.ndarray], captions: List[str],
               device: torch.device, batch_size: int = 32) -> float:
    """uint8 images [H, W, 3] and their captions (same order) -> the mean CLIP score, a float in [0, 100]."""
    model, tokenizer, processor = clip
    scores = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        text = tokenizer(captions[start:start + batch_size], padding=True, truncation=True,
                         max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        image_emb = _projected(model.get_image_features(pixel_values=pixels.to(device)))
        text_emb = _projected(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                      attention_mask=text["attention_mask"].to(device)))
        cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        scores.append(100.0 * cos.clamp(min=0).double().cpu())
    return float(torch.cat(scores).mean()) if scores else float("nan")


def _projected(features) -> torch.Tensor:
    """The projected embeddings [N, projection_dim]: transformers < 5 returns them, 5 wraps them in pooler_output."""
    return getattr(features, "pooler_output", features)
