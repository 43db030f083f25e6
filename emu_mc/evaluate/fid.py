"""Text-to-image FID from a local Inception network: no downloads at run time.

The network is a TorchScript file taking uint8-valued images [N, 3, H, W] (any size; it resizes to
299 itself) and returning 2048-d pool features for `model(images, return_features=True)`: the interface
of `inception-2015-12-05.pt` (the TF-FID Inception ported by NVIDIA's StyleGAN2-ADA / StyleGAN3 metrics,
the same weights pytorch-fid and clean-fid use). Give its path with --inception.
"""
import os
from typing import List

import numpy as np
import torch

from emu_mc.inference.settings import GenerationInputError


def load_inception(path: str, device: torch.device):
    if not path:
        raise GenerationInputError("--inception FILE is needed for FID (a local TorchScript Inception such as "
                                   "inception-2015-12-05.pt; nothing is downloaded at run time)")
    if not os.path.isfile(path):
        raise GenerationInputError(f"--inception {path}: no such file")
    try:
        return torch.jit.load(path, map_location=device).eval()
    except RuntimeError as err:
        raise GenerationInputError(f"--inception {path}: not a TorchScript file ({str(err).splitlines()[0]})") \
            from None


@torch.no_grad()
def inception_features(model, images: List[np.ndarray], device: torch.device) -> np.ndarray:
    """uint8 images [H, W, 3] (sizes may differ between images) -> features float64 [N, D]."""
    feats = []
    for image in images:  # one at a time: images may differ in size; the network resizes each
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].to(device)
        feats.append(model(x, return_features=True).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a [N, D] and b [M, D]: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals, as pytorch-fid does
        eps = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
