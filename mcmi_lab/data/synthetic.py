"""A synthetic image task whose Bayes conditional distribution P*(y|x) is known exactly.

The paper's claim is that an MCMI teacher estimates the Bayes posterior P*(y|x) better than an MLL teacher. On
real data P* is unknown; here it is computable, so a teacher can be scored by KL(P* ‖ P_teacher), ECE and accuracy
against the best possible classifier.

**The model.** K classes with uniform prior; given y, an image is x = b + mu_y + sigma * eps with eps ~ N(0, I_D),
D = C*H*W. The templates mu_k are smooth random fields (a seeded Gaussian field on a coarse grid, bicubically
upsampled), made zero-mean per channel, then orthogonalised by QR and rescaled to one common norm r:
mu_j . mu_k = r^2 * [j == k]. b is a constant image (`offset` in every pixel) so samples look like images.

**The posterior.** log p(x|k) = -||x - b - mu_k||^2 / (2 sigma^2) + c(x), hence
P*(k|x) = softmax_k( mu_k . (x - b) / sigma^2 - ||mu_k||^2 / (2 sigma^2) ), exact for any b. The norms are equal
and every mu_k is zero-mean per channel (so mu_k . b = 0 for the constant b), hence P*(k|x) = softmax_k(mu_k . x /
sigma^2): a known linear function of the raw image, the offset changes nothing.

**The overlap knob** is `separation` s = r / sigma (dimensionless); P* and the Bayes accuracy depend on s and K
only. `sigma` just sets the pixel scale (noise std per pixel), r = s * sigma.

**Bayes accuracy.** Take y = 0. The Bayes rule picks argmax_k mu_k . (x - b) = r^2 [k = 0] + sigma r z_k with
z_k = mu_k . eps / r; orthonormal directions make z_0..z_{K-1} i.i.d. N(0, 1). It is right iff
z_k < z_0 + r / sigma for every k != 0, so  acc(s, K) = ∫ φ(z) Φ(z + s)^(K-1) dz  (φ, Φ: standard normal pdf,
cdf), by symmetry the same for every class. :func:`bayes_accuracy` integrates it by the trapezoid rule on a
fine grid (the integrand is smooth and decays like φ, so the rule converges fast); s = 0 gives 1/K.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .core import ImageData, SPLITS, from_tensors
from ..utils import check_choice, check_float, check_int

#: Default sample counts of the two splits, and the per-split sample seeds (so train and test never share noise).
SPLIT_SIZES = {"train": 10_000, "test": 2_000}
SPLIT_SEEDS = {"train": 0, "test": 1}


def bayes_accuracy(separation: float, num_classes: int) -> float:
    """Accuracy of the Bayes classifier, ∫ φ(z) Φ(z + s)^(K-1) dz, for K classes with orthogonal, equal-norm
    means at separation s = ||mu|| / sigma (derivation in the module docstring)."""
    s = check_float("separation", separation, 0.0)
    k = check_int("num_classes", num_classes, minimum=2)
    z = torch.linspace(-14.0, 14.0 + s, 40_001, dtype=torch.float64)
    # log-space power: Φ^(K-1) underflows gracefully instead of producing 0 * inf
    integrand = torch.exp(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) + (k - 1) * torch.special.log_ndtr(z + s))
    return float(torch.trapezoid(integrand, z))


def kl_to_posterior(true_probs: torch.Tensor, model_probs: torch.Tensor) -> float:
    """Mean KL(P* ‖ P_model) in nats over the rows of (N, K) probabilities, computed in float64.

    Terms with P* = 0 contribute 0 (x log x -> 0). `model_probs` is clamped at the smallest normal number of its
    dtype: a float32 softmax that underflowed to 0 is a rounding artefact, not a certainty.
    """
    _check_probs("true_probs", true_probs)
    _check_probs("model_probs", model_probs)
    if true_probs.shape != model_probs.shape:
        raise ValueError(f"model_probs of shape {tuple(model_probs.shape)} is not accepted: expected the shape "
                         f"of true_probs {tuple(true_probs.shape)}")
    p = true_probs.double()
    q = model_probs.double().clamp_min(torch.finfo(model_probs.dtype).tiny)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q)), torch.zeros_like(p))
    return float(terms.sum(1).mean())


def _check_probs(name: str, probs: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or len(probs) == 0:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"{name} of shape {shape} is not accepted: expected a non-empty (N, K) tensor")
    p = probs.double()
    if bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-3):
        raise ValueError(f"{name} is not accepted: expected probabilities (rows >= 0 summing to 1), not logits")


def _generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts`: independent streams for templates and each sample call."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class SyntheticTask:
    """Class-conditional Gaussians x ~ N(offset + mu_y, sigma^2 I) around smooth orthogonal templates.

    num_classes: K; size: H = W; channels: C; separation: ||mu_k|| / sigma, the one overlap knob (3.0 gives a
    Bayes accuracy of 0.902 at K = 10; smaller = more overlap); sigma: noise std per pixel (pixel scale only);
    offset: constant added to every pixel; seed: the templates. See the module docstring for the math.
    """

    num_classes: int = 10
    size: int = 28
    channels: int = 1
    separation: float = 3.0
    sigma: float = 0.25
    offset: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, minimum=2)
        check_int("size", self.size, minimum=2)
        check_int("channels", self.channels, minimum=1)
        check_float("separation", self.separation, 0.0)
        check_float("sigma", self.sigma, 0.0, low_open=True)
        check_float("offset", self.offset)
        check_int("seed", self.seed, minimum=0)
        free = self.channels * (min(self._grid, self.size) ** 2 - 1)
        if self.num_classes > free:
            raise ValueError(f"num_classes={self.num_classes} is not accepted: expected at most {free} orthogonal "
                             f"zero-mean templates for {self.channels}x{self.size}x{self.size} images")

    @property
    def _grid(self) -> int:
        # coarse-grid side: 7 (smooth blobs at 28x28) unless K needs more zero-mean dimensions (2x headroom)
        return min(self.size, max(7, math.ceil(math.sqrt(2 * self.num_classes / self.channels + 1))))

    @property
    def norm(self) -> float:
        """||mu_k|| = separation * sigma, the same for every class."""
        return float(self.separation) * float(self.sigma)

    @property
    def templates(self) -> torch.Tensor:
        """mu: (K, C, H, W) float64, smooth, zero-mean per channel, orthogonal, each of norm `norm` (a copy)."""
        return self._templates.clone()

    @cached_property
    def _templates(self) -> torch.Tensor:
        k, c, g = self.num_classes, self.channels, min(self._grid, self.size)
        coarse = torch.randn(k, c, g, g, generator=_generator("templates", self.seed), dtype=torch.float64)
        fields = F.interpolate(coarse, size=(self.size, self.size), mode="bicubic", align_corners=False)
        fields = fields - fields.mean(dim=(2, 3), keepdim=True)
        q, r = torch.linalg.qr(fields.flatten(1).T)  # Gram-Schmidt in class order: column k spans fields 0..k
        q = q * torch.sign(torch.diagonal(r))  # fix QR's arbitrary signs so mu_k correlates positively with field k
        return (self.norm * q.T).reshape(k, c, self.size, self.size).contiguous()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Bayes logits mu_k . (x - offset) / sigma^2: (N, C, H, W) raw images -> (N, K) float64."""
        shape = (self.channels, self.size, self.size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images of shape {got} are not accepted: expected raw (N, {', '.join(map(str, shape))})"
                             f" images as stored by sample()")
        x = images.double().flatten(1) - self.offset
        mu = self._templates.to(x.device).flatten(1)
        return x @ mu.T / self.sigma ** 2

    def posterior(self, images: torch.Tensor) -> torch.Tensor:
        """Exact P*(y|x): (N, C, H, W) raw (un-normalised) images -> (N, K) float64 probabilities."""
        return torch.softmax(self.logits(images), dim=1)

    def bayes_accuracy(self) -> float:
        """Accuracy of argmax P*(y|x), in closed form (see :func:`bayes_accuracy`)."""
        return bayes_accuracy(self.separation, self.num_classes)

    def sample(self, n: int, seed: int = 0) -> ImageData:
        """n samples as an :class:`ImageData` (float32 images, name "synthetic", pad=0, flip=False: augmentation
        would change P*). Labels are balanced (n // K per class, the n % K extra ones on distinct random classes,
        then shuffled), so every sample's label is marginally uniform, as the prior says. The noise comes from
        (task seed, `seed`): the same pair gives identical data."""
        check_int("n", n, minimum=1)
        check_int("seed", seed, minimum=0)
        k = self.num_classes
        gen = _generator("sample", self.seed, seed)
        extra = torch.randperm(k, generator=gen)[:n % k]
        labels = torch.cat([torch.arange(k).repeat(n // k), extra])
        labels = labels[torch.randperm(n, generator=gen)]
        eps = torch.randn(n, self.channels, self.size, self.size, generator=gen)
        images = (self._templates.float()[labels] + self.offset).add_(eps, alpha=self.sigma)
        mean, std = self.pixel_stats
        return from_tensors(images, labels, [f"class {i}" for i in range(k)], mean=mean, std=std, name="synthetic",
                            pad=0, flip=False, unit_range=False)

    @property
    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of x under the task's own distribution, in closed form, so that every split is
        normalised alike: the templates are zero-mean per channel, so the mean is `offset`, and the variance is
        sigma^2 + the mean over classes (uniform prior) and pixels of mu^2."""
        var = self.sigma ** 2 + self._templates.pow(2).mean(dim=(0, 2, 3))
        return (float(self.offset),) * self.channels, tuple(float(v) for v in var.sqrt())


def load_synthetic(split: str = "train", n: int | None = None, **task_kwargs) -> ImageData:
    """A split of a :class:`SyntheticTask` (built from `task_kwargs`): "train" (default 10000 samples) or "test"
    (2000), drawn with different sample seeds. Score against P* with ``SyntheticTask(**task_kwargs).posterior``."""
    check_choice("split", split, SPLITS)
    task = SyntheticTask(**task_kwargs)
    return task.sample(SPLIT_SIZES[split] if n is None else n, seed=SPLIT_SEEDS[split])
