"""The teacher report card: every measure of a "good teacher" of one model, from one `predict` pass per split.

Accuracy, NLL, top-label ECE, Brier score, CMI, NCMI and the separation Γ on train and test, the per-class CMI,
and — where the Bayes posterior P* is known (the synthetic task) — KL(P* ‖ P) and the mean squared error to P*.
Every number comes from the logits through the library's one copy of its formula (evaluate.metrics_from_logits,
stats.expected_calibration_error / brier_score, synthetic.kl_to_posterior). `mcmi-lab inspect` prints it.

:func:`metric_correlations` asks which card metric predicts a good student: the Spearman rank correlation of each
teacher metric with each student metric across the teachers of one seed, then the mean over seeds with a t interval.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..training.checkpoint import load_checkpoint, load_model
from ..metrics.cmi import omitted_mass, probabilities
from ..data.core import ImageData, subset
from ..data.registry import load_dataset
from ..training.evaluate import metrics_from_logits, predict
from ..models.wrappers import TemperatureScaled
from ..metrics.stats import brier_score, expected_calibration_error, paired_difference, spearman
from ..data.synthetic import SyntheticTask, kl_to_posterior
from ..utils import check_int

#: The rows of a card: key -> (metric in words, unit). Unit "%" shows the value ×100.
CARD_ROWS = {
    "accuracy": ("accuracy", "%"),
    "nll": ("negative log-likelihood (NLL)", "nats"),
    "ece": ("expected calibration error (ECE, 15 bins)", "%"),
    "brier": ("Brier score Σ_k (p_k − 1[y=k])², mean", "0 to 2"),
    "cmi": ("CMI I(X; Ŷ | Y)", "nats"),
    "separation": ("separation Γ (cross entropy between classes)", "nats"),
    "ncmi": ("NCMI = CMI / Γ", "ratio"),
    "kl_to_posterior": ("KL(P* ‖ P), Bayes posterior to model", "nats"),
    "mse_to_posterior": ("squared error to P*, Σ_k (p_k − P*_k)², mean", "0 to 2"),
    "omitted_mass": ("omitted classes' mass on the others' images (zero-shot)", "prob"),
}
SPLIT_NAMES = ("train", "test")


def split_card(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
               true_probs: torch.Tensor | None = None) -> dict[str, Any]:
    """The card's metrics of one split from its logits (N, K), labels (N,) and optionally P* (N, K)."""
    metrics = metrics_from_logits(logits, labels, num_classes)
    probs = probabilities(logits)
    card = {"n": metrics["n"], "accuracy": metrics["accuracy"], "nll": metrics["nll"],
            "ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels),
            "cmi": metrics["cmi"], "separation": metrics["separation"], "ncmi": metrics["ncmi"],
            "per_class_cmi": metrics["per_class_cmi"]}
    if true_probs is not None:
        card["kl_to_posterior"] = kl_to_posterior(true_probs, probs)
        card["mse_to_posterior"] = brier_score(probs, true_probs)
    return card


def report_card(model: nn.Module, train: ImageData, test: ImageData,
                posterior: Callable[[torch.Tensor], torch.Tensor] | None = None, omitted: Sequence[int] | None = None,
                temperature: float = 4.0) -> dict[str, Any]:
    """The report card of `model` on `train` and `test`: one :func:`predict` pass per split (fp32 logits).

    posterior: the Bayes posterior P*(y|x) as a function of the raw stored images, (N, C, H, W) -> (N, K)
    probabilities (e.g. ``SyntheticTask().posterior``); then each split also gets KL(P* ‖ P) and the squared error
    to P*. omitted: classes a zero-shot student would not see; then each split also gets "omitted_mass"
    (:func:`mcmi_lab.metrics.cmi.omitted_mass` at the KD `temperature`, from the same logits) and the card names both.
    Returns a JSON-ready dict: ``{"model", "classes", "train": {...}, "test": {...}}``.
    """
    net = model.model if isinstance(model, TemperatureScaled) else model  # the spec is the base model's
    card: dict[str, Any] = {"model": dict(getattr(net, "spec", None) or {"name": type(net).__name__}),
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "temperature": float(model.temperature) if isinstance(model, TemperatureScaled) else None,
                            "data": test.name, "classes": list(test.classes)}
    for name, data in zip(SPLIT_NAMES, (train, test)):
        logits, labels = predict(model, data, precision="fp32")
        true_probs = posterior(data.images) if posterior is not None else None
        card[name] = split_card(logits, labels, data.num_classes, true_probs)
        if omitted is not None:
            card[name]["omitted_mass"] = omitted_mass(logits, labels, list(omitted), temperature)
    if omitted is not None:
        card["omitted"], card["omitted_temperature"] = sorted(set(omitted)), float(temperature)
    return card


def _value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.2f}" if unit == "%" else f"{value:.4f}"


def format_card(card: Mapping[str, Any]) -> str:
    """The card as a plain-text table: metric in words, unit, train, test; then the per-class CMI."""
    spec = card.get("model", {})
    model = (f"{spec.get('name', '?')} ({spec.get('in_channels', '?')} channel(s), {spec.get('num_classes', '?')} "
             f"classes, {card.get('parameters', 0):,} parameters)")
    if card.get("temperature") is not None:
        model += f", temperature-scaled T = {card['temperature']:.3g}"
    lines = [f"teacher report card: {model}" + (f" — {card['checkpoint']}" if card.get("checkpoint") else ""),
             f"data: {card.get('data')}, {card['train']['n']} train and {card['test']['n']} test samples", ""]
    if card.get("omitted") is not None:
        lines.insert(2, f"omitted classes {card['omitted']}: their probability at T = {card['omitted_temperature']:g} "
                        "summed, mean over the other classes' images")
    width = max(len(words) for words, _ in CARD_ROWS.values())
    lines.append(f"{'metric':<{width}}  {'unit':<7} {'train':>9} {'test':>9}")
    for key, (words, unit) in CARD_ROWS.items():
        if key in card["train"] or key in card["test"]:
            lines.append(f"{words:<{width}}  {unit:<7} {_value(card['train'].get(key), unit):>9} "
                         f"{_value(card['test'].get(key), unit):>9}")
    classes = card.get("classes") or [str(i) for i in range(len(card["test"]["per_class_cmi"]))]
    cw = max(len("class"), *(len(str(c)) for c in classes))
    lines += ["", "per-class CMI (nats), mean KL(P_x ‖ Q_y) over the samples of each class:",
              f"{'class':<{cw}}  {'train':>9} {'test':>9}"]
    for c, a, b in zip(classes, card["train"]["per_class_cmi"], card["test"]["per_class_cmi"]):
        lines.append(f"{str(c):<{cw}}  {a:>9.4f} {b:>9.4f}")
    return "\n".join(lines)


# ---- a checkpoint and its data (mcmi-lab inspect) ---------------------------------------------------------------

CHECKPOINTS_ACCEPTED = ("a model.pt written by `mcmi-lab train`, a run's checkpoints/teacher_<name>.pt or a file "
                        "written by save_model / save_teacher")


def load_any_model(path: str | os.PathLike) -> nn.Module:
    """A model saved by save_model / save_teacher / `mcmi-lab train` (weights_only), temperature-scaled when the
    checkpoint holds a temperature (as :func:`mcmi_lab.study.runs.load_teacher` rebuilds it), in eval mode."""
    try:
        model = load_model(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: expected {CHECKPOINTS_ACCEPTED}") from None
    except ValueError as err:
        raise ValueError(f"{err} (expected {CHECKPOINTS_ACCEPTED})") from None
    temperature = load_checkpoint(path).get("temperature")
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1 and temperature.is_floating_point():
        temperature = temperature.item()
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"checkpoint {str(path)!r} holds the temperature {temperature!r}: expected a finite number "
                         "> 0 (the teacher's logits are divided by it)")
    return (TemperatureScaled(model, temperature) if temperature is not None else model).eval()


def _check_fits(model: nn.Module, data: ImageData, path: str, dataset: str) -> None:
    spec = (model.model if isinstance(model, TemperatureScaled) else model).spec
    if (spec["in_channels"], spec["num_classes"]) != (data.in_channels, data.num_classes):
        raise ValueError(f"checkpoint {path!r} ({spec['name']}: {spec['in_channels']} channel(s), "
                         f"{spec['num_classes']} classes) does not fit --data {dataset} ({data.in_channels} "
                         f"channel(s), {data.num_classes} classes): expected a data set with "
                         f"{spec['in_channels']}-channel images and {spec['num_classes']} classes")


def inspect_checkpoint(path: str | os.PathLike, dataset: str, train_size: int | None = None,
                       test_size: int | None = None, root: str | os.PathLike | None = None,
                       seed: int = 0, omitted: Sequence[int] | None = None, temperature: float = 4.0
                       ) -> dict[str, Any]:
    """The report card of the checkpoint at `path` on data set `dataset` (a registered name or a path): its
    training split (or `train_size` samples of it, a seeded class-interleaved subset) and test split (`test_size`).
    For "synthetic" the card includes KL(P* ‖ P) and the squared error to P* (the default SyntheticTask's P*)."""
    sizes = [None if n is None else check_int(f"--{split}-size", n, minimum=1)
             for split, n in zip(SPLIT_NAMES, (train_size, test_size))]
    model = load_any_model(path)
    splits = []
    for split, size in zip(SPLIT_NAMES, sizes):
        data = load_dataset(dataset, split, root=root)
        splits.append(subset(data, size, seed=seed) if size is not None and size < len(data) else data)
    _check_fits(model, splits[0], str(path), str(dataset))
    posterior = SyntheticTask().posterior if dataset == "synthetic" else None
    try:
        card = report_card(model, *splits, posterior=posterior, omitted=omitted, temperature=temperature)
    except RuntimeError as err:  # e.g. an image size the model's layers do not take
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"checkpoint {str(path)!r} could not run on --data {dataset} images "
                         f"{tuple(splits[0].images.shape[1:])}: {first}") from None
    return {"checkpoint": str(path), **card}


# ---- which teacher metric predicts a good student? ---------------------------------------------------------------

#: Teacher metrics, in the order shown, as the rows of 07 (model_metrics) and 08 (known_bcpd) name them.
TEACHER_METRICS = {
    "test_acc": "test accuracy", "accuracy": "test accuracy", "train_acc": "train accuracy",
    "test_nll": "test NLL", "test_ece": "test ECE", "ece": "test ECE", "test_brier": "test Brier score",
    "train_cmi": "train CMI", "test_cmi": "test CMI", "train_ncmi": "train NCMI", "test_ncmi": "test NCMI",
    "train_separation": "train Γ", "test_separation": "test Γ", "kl_to_bayes": "KL(P* ‖ P) on test",
    "omitted_mass": "omitted classes' mass at the KD T (train)",
}
STUDENT_METRICS = {"student_acc": "KD student accuracy", "few_shot_acc": "few-shot student accuracy",
                   "zero_shot_omitted_acc": "zero-shot accuracy on the omitted classes"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_correlations(rows_by_seed: Mapping[Any, Sequence[Mapping[str, Any]]],
                        teacher_metrics: Sequence[str] | None = None,
                        student_metrics: Sequence[str] | None = None, confidence: float = 0.95) -> list[dict]:
    """Spearman ρ of each teacher metric with each student metric across the teachers of each seed, then the mean
    over seeds with a two-sided t interval (:func:`mcmi_lab.metrics.stats.paired_difference` of the ρ against 0), clipped
    to [-1, 1] where ρ lives (with few seeds the t interval reaches beyond).

    rows_by_seed: ``{seed: [row, ...]}``, a row per teacher holding both kinds of metric; rows without a number for
    the pair are left out, and a teacher recorded twice (the same numbers, e.g. one model serving two doses) counts
    once. A seed with fewer than 3 teachers or a constant metric gives no ρ. Default metrics: those of
    :data:`TEACHER_METRICS` / :data:`STUDENT_METRICS` present in the rows. Returns one dict per pair: ``teacher,
    student, mean, low, high, n`` (seeds with a ρ), ``teachers`` (teachers per seed, min and max), ``per_seed``.
    """
    present = {k for rs in rows_by_seed.values() for r in rs for k, v in r.items() if _number(v)}
    teacher_metrics = [m for m in (teacher_metrics or TEACHER_METRICS) if m in present]
    student_metrics = [m for m in (student_metrics or STUDENT_METRICS) if m in present]
    out = []
    for s in student_metrics:
        for t in teacher_metrics:
            per_seed, counts = {}, []
            for seed, rows in rows_by_seed.items():
                pairs = list(dict.fromkeys((r[t], r[s]) + tuple(r.get(m) for m in teacher_metrics)
                                           for r in rows if _number(r.get(t)) and _number(r.get(s))))
                if len(pairs) < 3:
                    continue
                counts.append(len(pairs))
                rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
                if math.isfinite(rho):
                    per_seed[seed] = rho
            d = (paired_difference(list(per_seed.values()), [0.0] * len(per_seed), confidence) if per_seed else
                 {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0})
            low, high = (d["low"], d["high"]) if math.isnan(d["low"]) else (max(-1.0, d["low"]), min(1.0, d["high"]))
            out.append({"teacher": t, "student": s, "mean": d["mean"], "low": low, "high": high,
                        "n": d["n"], "teachers": (min(counts), max(counts)) if counts else (0, 0),
                        "per_seed": per_seed})
    return out
