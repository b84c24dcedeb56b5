"""Dose-matched teachers: the other ways of raising a teacher's train CMI, at the same CMI as an MCMI teacher.

The dose of a teacher is its train CMI I(X; Ŷ | Y) in nats (``measure_cmi(teacher, train)["cmi"]``), not the λ
that produced it: the CMI a fixed λ gives depends on the learning rate, the steps, the data and the teacher.
An MCMI teacher gets a dose with ``finetune_mcmi(teacher, data, target_cmi=c)``; the controls get the same dose here:

* :func:`match_temperature` — the MLL teacher's logits divided by the T that gives train CMI c (no training: the
  train logits are predicted once, then T is searched on them; CMI rises with T up to a peak and then falls to 0,
  as the outputs become uniform, so high doses are out of its reach).
* :func:`match_label_smoothing` — the label-smoothing fine-tune (the MCMI recipe with smoothed labels instead of
  the CMI term) whose ε gives train CMI c, by a short search (each try one fine-tune). Label smoothing may not
  reach a dose at all: its optimum puts every sample of a class on the same vector, so it raises CMI only through
  the imperfect fit; the search then returns the closest teacher and says so.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..metrics.cmi import conditional_mutual_information, probabilities
from ..data.core import ImageData, few_shot, omit_classes
from ..training.evaluate import evaluate, measure_cmi, predict
from ..models.wrappers import TemperatureScaled
from .runs import save_teacher
from ..training.objectives import StopTraining, check_target_cmi, collapse_floor
from .recipes import (DOSE_TOLERANCE, _refuse_lam, check_doses, finetune_control, finetune_label_smoothing,
                      finetune_mcmi, finetune_mcmi_doses, matched, train_students)
from ..utils import check_float, check_int

# ---- temperature ------------------------------------------------------------------------------------------------

def cmi_at_temperature(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> float:
    """Train CMI of softmax(logits / T): what a temperature-scaled teacher would measure on these samples."""
    return float(conditional_mutual_information(probabilities(logits, temperature), labels, num_classes))


def match_temperature(model: nn.Module, data: ImageData, target_cmi: float, *, max_temperature: float = 100.0,
                      iterations: int = 60) -> tuple[TemperatureScaled, float]:
    """The temperature-scaled teacher whose train CMI on `data` is `target_cmi`; returns (teacher, CMI reached).

    CMI is not monotone in T: it rises from T = 1 to a peak (outputs spread inside each class) and falls to 0 as the
    outputs become uniform (measured on the demo teacher: peak 0.076 nats at T ≈ 2.8). So the peak is located on a
    log grid up to `max_temperature`, then log T is bisected on the rising side; a dose above the peak cannot be
    reached (a warning, and the peak's teacher). A teacher above the dose at T = 1 is sharpened (T < 1).
    One `predict` pass; each evaluation is a tensor op on its logits.
    """
    target = check_target_cmi(target_cmi, data.num_classes)
    check_float("max_temperature", max_temperature, 1.0, low_open=True)
    logits, labels = predict(model, data)
    cmi = lambda t: cmi_at_temperature(logits, labels, data.num_classes, t)  # noqa: E731
    grid = [math.exp(i * math.log(max_temperature) / 48) for i in range(49)]
    peak = max(grid, key=cmi)
    if cmi(peak) < target:
        warnings.warn(f"temperature scaling cannot reach train CMI {target:g}: its highest, at T = {peak:.3g}, is "
                      f"{cmi(peak):.4f} nats; returning that teacher", stacklevel=2)
        return TemperatureScaled(model, peak), cmi(peak)
    low, high = 1.0, peak
    while cmi(low) > target and low > 1e-3:
        low /= 2
    for _ in range(check_int("iterations", iterations, minimum=1)):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if cmi(mid) < target else (low, mid)
    t = math.sqrt(low * high)
    return TemperatureScaled(model, t), cmi(t)


# ---- label smoothing --------------------------------------------------------------------------------------------

@dataclass
class SmoothingSearch:
    """The tries of :func:`match_label_smoothing`: ε -> (fine-tuned teacher, its train CMI). Pass the same object
    to several targets of one teacher and data, and a later target reuses the earlier fine-tunes (a try within the
    tolerance is taken as it is; the others guide the next ε)."""

    tries: dict[float, tuple[nn.Module, float]] = field(default_factory=dict)

    def points(self) -> list[tuple[float, float]]:
        return sorted((eps, cmi) for eps, (_, cmi) in self.tries.items())

    def next_epsilon(self, target: float, first: float) -> float | None:
        """The next ε to try: interpolation (in log CMI) between the tries that bracket the target, else a step
        towards it from the nearest try; None when the bracket has shrunk below 0.005 in ε."""
        pts = [(0.0, self.tries[0.0][1])] if 0.0 in self.tries else []
        pts = sorted(set(pts + self.points()))
        if not pts:
            return first
        below = [p for p in pts if p[1] < target]
        above = [p for p in pts if p[1] >= target]
        if below and above:
            (e0, c0), (e1, c1) = max(below), min(above)
            if abs(e1 - e0) < 0.005:
                return None
            w = (math.log(target) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return round(e0 + w * (e1 - e0), 4)
        if below:  # every try is below the dose: smooth more, unless the CMI has already turned down with ε
            e, c = max(below)
            if e >= 0.95 or c < max(cmi for _, cmi in below):
                return None  # CMI rises with ε to a peak, then falls (uniform targets): the dose is above the peak
            return round(min(0.95, max(2 * e, e + 0.1)), 4)
        e = min(above)[0]  # every try is above: smooth less
        return None if e <= 0.005 else round(e / 2, 4)


def match_label_smoothing(teacher: nn.Module, data: ImageData, target_cmi: float, epochs: int = 20, *,
                          search: SmoothingSearch | None = None, max_tries: int = 4, first_epsilon: float = 0.2,
                          tolerance: float = DOSE_TOLERANCE, **finetune_kwargs
                          ) -> tuple[nn.Module, float, float]:
    """The label-smoothing fine-tune of `teacher` whose train CMI is within `tolerance` of `target_cmi`.

    Each try is :func:`mcmi_lab.study.recipes.finetune_label_smoothing` (same epochs, lr, schedule as the MCMI recipe);
    at most `max_tries` new fine-tunes. Returns (teacher, ε, train CMI reached); when no try is within the tolerance,
    the closest one, with a warning naming the CMI reached.
    """
    target = check_target_cmi(target_cmi, data.num_classes)
    check_int("max_tries", max_tries, minimum=1)
    search = search if search is not None else SmoothingSearch()
    for _ in range(max_tries):
        best = _closest(search, target)
        if best is not None and matched(best[2], target, tolerance):
            return best
        eps = search.next_epsilon(target, first_epsilon)
        if eps is None or eps in search.tries:
            break
        model, _ = finetune_label_smoothing(teacher, data, eps, epochs, **finetune_kwargs)
        search.tries[eps] = (model, float(measure_cmi(model, data)["cmi"]))
    best = _closest(search, target)
    if not matched(best[2], target, tolerance):
        warnings.warn(f"label smoothing did not reach train CMI {target:g} within ±{tolerance:.0%}: the closest try, "
                      f"ε = {best[1]:g}, gave {best[2]:.4f} nats (tries: "
                      + ", ".join(f"ε {e:g} → {c:.4f}" for e, c in search.points()) + ")", stacklevel=2)
    return best


def _closest(search: SmoothingSearch, target: float) -> tuple[nn.Module, float, float] | None:
    if not search.tries:
        return None
    eps = min(search.tries, key=lambda e: abs(math.log(max(search.tries[e][1], 1e-12) / target)))
    model, cmi = search.tries[eps]
    return model, eps, cmi


# ---- the study's teachers -----------------------------------------------------------------------------------------

def dose_teachers(teacher: nn.Module, data: ImageData, doses: list[float], epochs: int, *, echo=print,
                  **finetune_kwargs) -> list[tuple[dict, nn.Module | None]]:
    """The dose-response study's teachers from one MLL `teacher`: the λ = 0 control (dose 0), then at each dose an
    MCMI teacher (CMI target), the matched label-smoothing teacher (one search shared by all doses) and the matched
    temperature-scaled teacher. Returns (row, model) pairs, the row naming method, dose, what was set (λ at the
    end and the selected epoch, ε, T) and ``collapsed``: True when the teacher does not work in eval mode (its
    eval-mode train accuracy below :func:`mcmi_lab.training.objectives.collapse_floor` of the MLL teacher's at every epoch
    of an MCMI fine-tune, or at the end of the control's and of the chosen label-smoothing fine-tune; an MCMI run
    the collapse guard stops is collapsed too and has no model: None). A collapsed teacher is never a dose: the
    caller records it with ``matched`` False and distils nothing from it. A method that misses a dose is still
    returned (the warning goes to `echo` as one line; the caller checks ``matched``)."""
    doses = check_doses(doses)
    _refuse_lam(finetune_kwargs)

    def quietly(make):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = make()
        for w in caught:
            echo(f"  note: {str(w.message).splitlines()[0]}")
        return out

    floor = collapse_floor(measure_cmi(teacher, data)["accuracy"], data.num_classes)

    def broken(model: nn.Module) -> bool:  # one eval-mode pass of a trained control teacher
        return floor is not None and measure_cmi(model, data)["accuracy"] < floor

    control, _ = finetune_control(teacher, data, epochs, **finetune_kwargs)
    out = [({"method": "control", "dose": 0.0, "collapsed": broken(control)}, control)]
    try:  # the MCMI teachers of all doses as one stack where the architecture allows
        dosed = dict(zip(doses, quietly(lambda: finetune_mcmi_doses(teacher, data, doses, epochs, **finetune_kwargs))))
    except StopTraining as stop:  # a member collapsed: one at a time, so that the other doses are kept
        echo(f"  MCMI stack stopped ({stop}): the doses one at a time")
        dosed = {}
        for dose in doses:
            try:
                dosed[dose] = quietly(lambda: finetune_mcmi(teacher, data, target_cmi=dose, epochs=epochs,
                                                            **finetune_kwargs))
            except StopTraining as stop:
                echo(f"  MCMI at {dose:g}: collapsed ({stop})")
                dosed[dose] = (None, str(stop))
    search = SmoothingSearch()
    for dose in doses:
        mcmi, hist = dosed[dose]
        if mcmi is None:  # stopped by the collapse guard: no teacher
            out.append(({"method": "mcmi", "dose": dose, "collapsed": True, "stopped": hist}, None))
        else:
            out.append(({"method": "mcmi", "dose": dose, "lam_final": hist[-1]["lam"],
                         "selected_epoch": hist[-1]["selected_epoch"], "collapsed": bool(hist[-1]["collapsed"])},
                        mcmi))
        smoothed, eps, _ = quietly(lambda: match_label_smoothing(teacher, data, dose, epochs, search=search,
                                                                 **finetune_kwargs))
        out.append(({"method": "label_smoothing", "dose": dose, "epsilon": eps, "collapsed": broken(smoothed)},
                    smoothed))
        scaled, _ = quietly(lambda: match_temperature(teacher, data, dose))
        # T > 0 keeps every argmax: a temperature-scaled teacher has the MLL teacher's accuracy
        out.append(({"method": "temperature", "dose": dose, "temperature": float(scaled.temperature),
                     "collapsed": False}, scaled))
    return out


def save_dose_teacher(run_dir, row: dict, model: nn.Module, prefix: str = "dose") -> str:
    """Save a study teacher as ``checkpoints/teacher_<prefix>_<method>[_<dose>].pt`` under `run_dir`
    (:func:`mcmi_lab.study.runs.save_teacher`: a temperature-scaled teacher as its base model plus T, so load_teacher,
    ``mcmi-lab inspect`` and the explorers open it) and return that path relative to `run_dir`: the row's
    ``checkpoint``. The control (dose 0) is named without a dose."""
    name = f"{prefix}_{row['method']}" + ("" if row["method"] == "control" else f"_{row['dose']:g}")
    path = save_teacher(run_dir, name, model, method=row["method"], dose=float(row["dose"]))
    return path.relative_to(run_dir).as_posix()


def dose_students(teachers: list[nn.Module], train: ImageData, test: ImageData, few: float, omitted: list[int],
                  shot_epochs: int, names: list[str] | None = None, **student_kw) -> list[dict]:
    """The study's three students of every teacher, one dict of test accuracies per teacher: KD on `train`
    ("student_acc"), KD on the stratified fraction `few` of it for `shot_epochs` ("few_shot_acc") and KD without the
    classes `omitted` (mean accuracy on them, "zero_shot_omitted_acc"). `student_kw`: :func:`recipes.train_student`'s
    keywords (model, epochs, seed, temperature, lr, TrainConfig fields); the few-shot subset is seeded by its seed.
    Each kind of student is trained for all teachers as one stack where the student architecture allows
    (:func:`recipes.train_students`), one at a time otherwise. `names`: one per teacher (e.g. "mcmi 0.1"), naming
    its students' progress lines and TensorBoard runs ("KD student ← mcmi 0.1", "few-shot …", "zero-shot …")."""
    seed = student_kw.get("seed", 0)

    def called(kind):
        return None if names is None else [f"{kind} student ← {n}" for n in names]
    full = train_students(teachers, train, "kd", names=called("KD"), **student_kw)
    shot = train_students(teachers, few_shot(train, few, seed), "kd", names=called(f"few-shot ({few:g})"),
                          **{**student_kw, "epochs": shot_epochs})
    zero = train_students(teachers, omit_classes(train, omitted), "kd", names=called("zero-shot"), **student_kw)
    out = []
    for (student, _), (shot_student, _), (zero_student, _) in zip(full, shot, zero):
        per_class = evaluate(zero_student, test)["per_class_accuracy"]
        out.append({"student_acc": evaluate(student, test)["accuracy"],
                    "few_shot_acc": evaluate(shot_student, test)["accuracy"],
                    "zero_shot_omitted_acc": sum(per_class[c] for c in omitted) / len(omitted)})
    return out
