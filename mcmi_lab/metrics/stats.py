"""Seeds and statistics across runs: mean ± std, paired confidence intervals, per-seed summaries, calibration.

Every claim needs several seeds (DESIGN §2, "the regime matters"); comparisons of two teachers are paired by
seed (same data order and student seed, only the teacher differs), so the interval is on the per-seed differences.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..utils import check_float, check_int

#: The random streams of one run, in the order of :func:`derive_seeds`.
SEED_STREAMS = ("teacher", "finetune", "student")


def derive_seeds(run_seed: int) -> dict[str, int]:
    """The seeds of one run: ``{"teacher": 3r, "finetune": 3r + 1, "student": 3r + 2}`` for run seed r.

    The map r -> (3r, 3r+1, 3r+2) is injective, so the three streams differ within a run and no seed is reused by
    another run. A control and an MCMI fine-tune of the same run share the finetune seed, and students of both
    teachers share the student seed: only the teacher changes.
    """
    r = check_int("run_seed", run_seed, minimum=0)
    return {name: len(SEED_STREAMS) * r + i for i, name in enumerate(SEED_STREAMS)}


def _floats(name: str, values: Iterable[Any]) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={values!r} is not accepted: expected a sequence of numbers") from None
    if not out:
        raise ValueError(f"{name}=[] is not accepted: expected at least one value")
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample std with ddof = 1) of the values; the std of a single value is 0."""
    v = _floats("values", values)
    mean = math.fsum(v) / len(v)
    if len(v) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1))


def paired_difference(a: Iterable[float], b: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of d_i = a_i - b_i with a two-sided Student-t interval: mean ± t_{(1+c)/2, n-1} · std / sqrt(n).

    Returns ``{"mean", "low", "high", "n", "std", "confidence"}`` (std: sample std of the d_i). With n = 1 the
    interval is undefined: low = high = nan. The t quantile comes from scipy (already installed with grad-cam).
    """
    a, b = _floats("a", a), _floats("b", b)
    if len(a) != len(b):
        raise ValueError(f"b of length {len(b)} is not accepted: expected as many values as a ({len(a)}), "
                         f"paired by seed")
    c = check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    d = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(d)
    n = len(d)
    if n == 1:
        low = high = math.nan
    else:
        from scipy.stats import t  # lazy: scipy.stats costs ~0.5 s to import

        half = float(t.ppf(0.5 + c / 2, n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "n": n, "std": std, "confidence": c}


def seeds_for_half_width(std: float, half_width: float = 2.0, confidence: float = 0.95,
                         max_seeds: int = 10_000) -> int | None:
    """The smallest number of seeds n >= 2 whose two-sided t interval of a mean, t_{(1+c)/2, n-1} · std / sqrt(n),
    is at most `half_width` wide on each side, for a seed-to-seed spread `std` (sample std of the per-seed values,
    e.g. of paired differences). None when `std` is not a finite number >= 0 or more than `max_seeds` would be needed.
    """
    check_float("half_width", half_width, 0.0, low_open=True)
    c = check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        return None
    from scipy.stats import t  # lazy: scipy.stats costs ~0.5 s to import

    def wide(n: int) -> float:
        return float(t.ppf(0.5 + c / 2, n - 1)) * std / math.sqrt(n)

    if wide(max_seeds) > half_width:
        return None
    low, high = 1, max_seeds  # wide(n) falls with n: bisect for the first n with wide(n) <= half_width
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if wide(mid) <= half_width else (mid, high)
    return high


def slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of y on x: Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²; nan when the x do not vary."""
    x, y = _floats("xs", xs), _floats("ys", ys)
    if len(x) != len(y):
        raise ValueError(f"ys of length {len(y)} is not accepted: expected as many values as xs ({len(x)})")
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    return math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else math.nan


def slope_over_seeds(points: Mapping[Any, Sequence[tuple[float, float]]], confidence: float = 0.95) -> dict[str, float]:
    """The dose-response slope: one least-squares slope of y on x per seed (its doses), then their mean with a
    Student-t interval over the seeds (:func:`paired_difference` of the slopes against 0), so that the interval
    reflects seed-to-seed variation and the points of one seed are not counted as independent.

    points: ``{seed: [(x, y), ...]}``; seeds with fewer than two distinct x are left out. Returns the keys of
    :func:`paired_difference` (``mean``, ``low``, ``high``, ``n``, ...); None-free, nan where undefined.
    """
    slopes = [s for s in (slope([p[0] for p in pts], [p[1] for p in pts]) for pts in points.values() if len(pts) >= 2)
              if math.isfinite(s)]
    if not slopes:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "std": math.nan,
                "confidence": confidence}
    return paired_difference(slopes, [0.0] * len(slopes), confidence)


def _lookup(result: Mapping[str, Any], key: str) -> Any:
    """result[key], else the dotted path ("teacher.test_acc" -> result["teacher"]["test_acc"]); None if absent."""
    if key in result:
        return result[key]
    node: Any = result
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def summarize(results: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per-seed result dicts -> ``{key: {"mean", "std", "n"}}``.

    keys: names or dotted paths into nested dicts; default: every top-level numeric key, in first-seen order.
    A result that lacks a key (or holds None) is left out of that key's n; no value at all gives nan, nan, 0.
    """
    if isinstance(results, Mapping) or not all(isinstance(r, Mapping) for r in results):
        raise ValueError(f"results of type {type(results).__name__} are not accepted: expected a list of dicts")
    if keys is None:
        keys = list(dict.fromkeys(k for r in results for k, v in r.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
    elif isinstance(keys, str):
        keys = [keys]
    summary = {}
    for key in keys:
        values = [v for v in (_lookup(r, key) for r in results) if v is not None]
        if values:
            mean, std = mean_std(_floats(key, values))
            summary[key] = {"mean": mean, "std": std, "n": len(values)}
        else:
            summary[key] = {"mean": math.nan, "std": math.nan, "n": 0}
    return summary


def format_mean_std(mean: float, std: float, n: int, digits: int = 1) -> str:
    """"84.2 ± 1.3 (n=3)": mean ± sample std over n runs, `digits` decimals."""
    check_int("digits", digits, minimum=0)
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f} (n={int(n)})"


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017, https://arxiv.org/abs/1706.04599) with `bins` equal-width bins.

    probs: (N, K) probabilities; labels: (N,). Bin b holds the confidences max_k p in (b/B, (b+1)/B];
    ECE = Σ_b (n_b / N) |accuracy_b - mean confidence_b|, in float64.
    """
    check_int("bins", bins, minimum=1)
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or len(probs) == 0:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs of shape {shape} is not accepted: expected a non-empty (N, K) tensor")
    labels = torch.as_tensor(labels, device=probs.device)
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} are not accepted: expected ({len(probs)},)")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels.long()).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, weights=correct - confidence, minlength=bins)  # Σ (correct - conf) per bin
    # Σ_b (n_b/N)|acc_b - conf_b| = Σ_b |Σ_{i in b}(correct_i - conf_i)| / N
    return float(gap.abs().sum() / count.sum())


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-class Brier score (Brier 1950): mean over samples of Σ_k (p_k − t_k)², in float64, between 0 and 2.

    probs: (N, K) probabilities; targets: (N,) labels (t = one-hot) or (N, K) target probabilities — with the
    Bayes posterior P* as targets this is the mean squared error to P*.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or len(probs) == 0:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs of shape {shape} is not accepted: expected a non-empty (N, K) tensor")
    targets = torch.as_tensor(targets, device=probs.device)
    if targets.shape == probs.shape[:1] and not targets.is_floating_point():
        targets = torch.nn.functional.one_hot(targets.long(), probs.shape[1])
    elif targets.shape != probs.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} are not accepted: expected labels "
                         f"({len(probs)},) or probabilities {tuple(probs.shape)}")
    return float(((probs.double() - targets.double()) ** 2).sum(1).mean())


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Spearman's rank correlation ρ: the Pearson correlation of the ranks (ties get their average rank, as
    scipy.stats.spearmanr does); nan when fewer than two pairs or either side is constant."""
    x, y = _floats("xs", xs), _floats("ys", ys)
    if len(x) != len(y):
        raise ValueError(f"ys of length {len(y)} is not accepted: expected as many values as xs ({len(x)})")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = math.fsum(rx) / len(rx), math.fsum(ry) / len(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = math.fsum((a - mx) ** 2 for a in rx), math.fsum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
