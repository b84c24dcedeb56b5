"""CMI measurement against bare inference, and its peak memory at two data sizes.

For every case, in one process and interleaved:

* measure_cmi — ``mcmi_lab.training.evaluate.measure_cmi`` over the training set (streaming CMIMeter: CMI, Γ, NCMI,
                centroids, accuracy);
* inference   — the model's forward over the same batches in the same precision and memory format, inputs already
                normalised and resident, nothing kept: the compute limit of a pass.

cmi/infer = t(inference) / t(measure_cmi) (target ≥ 0.9). Then the peak memory of measure_cmi above the resident
data at `n` and `4n` samples (it must not grow with n), with predict's (which keeps every logit) for contrast.
Run: ``python -m benchmarks.cmi [--cases ...] [--device cuda]``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from mcmi_lab.data.core import ImageData, batches
from mcmi_lab.training.evaluate import eval_batch_size, measure_cmi, predict
from mcmi_lab.training.runtime import autocast_dtype

from . import common

#: epoch size of the small CNNs (see common.case_samples), --quick size, interleaved repetitions
DEFAULTS = dict(samples=5000, quick_samples=512, reps=5)


def resident_batches(data: ImageData, model: nn.Module, batch_size: int) -> list[torch.Tensor]:
    """The normalised batches of `data` on the model's device, in the model's memory format."""
    p = next(model.parameters())
    conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    fmt = torch.channels_last if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        and not conv.is_contiguous() else torch.contiguous_format
    return [x.to(p.device).contiguous(memory_format=fmt) for x, _ in batches(data, batch_size)]


def bare_inference(model: nn.Module, inputs: list[torch.Tensor], precision: str | None) -> None:
    amp = autocast_dtype(precision or "fp32", inputs[0].device)
    model.eval()
    with torch.inference_mode(), torch.autocast(inputs[0].device.type, dtype=amp or torch.float32,
                                                enabled=amp is not None):
        for x in inputs:
            model(x)


def measure_case(case: common.Case, args, device: torch.device) -> dict:
    batch = eval_batch_size(device)
    n = common.case_samples(case, args.samples, batch, device)
    data = common.make_data(case.data, n).to(device)
    model = common.make_model(case, data, device).eval()
    inputs = resident_batches(data, model, batch)
    precision = args.precision
    fns = {"measure_cmi": lambda: measure_cmi(model, data, precision=precision),
           "inference": lambda: bare_inference(model, inputs, precision)}
    times = common.interleave(fns, args.reps, device)
    return {"case": case.label, "n": n, "batch": batch, "img/s": {k: n / common.median(v) for k, v in times.items()},
            "cmi/infer": common.ratio(times, "inference", "measure_cmi")}


def measure_memory(case: common.Case, sizes: tuple[int, int], precision: str | None,
                   device: torch.device) -> list[list]:
    """Peak memory above the resident data of measure_cmi (O(K²) state) and predict (keeps all N·K logits)."""
    rows = []
    model = None
    for size in sizes:
        data = common.make_data(case.data, size).to(device)
        if model is None:
            model = common.make_model(case, data, device).eval()
        with common.PeakMemory(device) as peak_cmi:
            measure_cmi(model, data, precision=precision)
        with common.PeakMemory(device) as peak_predict:
            predict(model, data, precision=precision)
        rows.append([case.label, size, peak_cmi.mib, peak_predict.mib])
    return rows


def run(args, device: torch.device) -> dict:
    print(common.header("CMI measurement vs bare inference", device, args)
          + f" | precision {args.precision or 'library default'} | eval batch {eval_batch_size(device)}", flush=True)
    results = []
    for case in args.cases:
        results.append(measure_case(case, args, device))
        print(f"  {case.label}: cmi/infer={results[-1]['cmi/infer']:.2f}", flush=True)
    rows = [[r["case"], r["n"], r["img/s"]["measure_cmi"], r["img/s"]["inference"], r["cmi/infer"]] for r in results]
    print(common.table(["case", "n", "measure_cmi img/s", "inference img/s", "cmi/infer"], rows))
    m = results[0]["n"]
    memory = measure_memory(args.cases[0], (m, 4 * m), args.precision, device)
    print(common.table(["case", "samples", "peak MiB measure_cmi", "peak MiB predict"], memory))
    print("(peak: torch allocations above the resident data during the call; "
          + ("torch.cuda.max_memory_allocated)" if device.type == "cuda" else "torch.profiler memory events)"))
    headline = {"cmi/infer": results[0]["cmi/infer"]}
    print(common.ratio_line(headline), flush=True)
    return headline


def add_options(p) -> None:
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "auto"),
                   help="precision= of measure_cmi, and of the bare pass (default: the library's default, fp32)")


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
