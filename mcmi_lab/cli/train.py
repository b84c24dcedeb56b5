"""One training run from the command line, on one process or many (torchrun + DistributedDataParallel).

    python -m mcmi_lab.cli.train train --data fashion-mnist --model cnn_small --epochs 5 --out runs/teacher
    torchrun --nproc_per_node=4 -m mcmi_lab.cli.train train --objective mcmi --lam 0.5 --teacher runs/teacher/model.pt ...
    mcmi-lab train ... --nproc 4        # re-executes itself under `python -m torch.distributed.run`

Every rank holds the whole data set as one tensor and trains on its own shard of each epoch (`fit` shards by rank);
the model is wrapped in DDP, a KD teacher stays a plain frozen module on every rank, and rank 0 alone writes
``<out>/checkpoint.pt`` (every epoch), ``<out>/model.pt`` and ``<out>/results.json``. ``--resume`` continues the
checkpoint to the same weights as an uninterrupted run. Across nodes, ``--out`` must be on a shared file system.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..training import distributed as dist_utils
from ..training.checkpoint import load_checkpoint, load_model, save_model
from ..data.core import few_shot, omit_classes, subset
from ..data.registry import DATASETS, load_dataset
from ..training.evaluate import evaluate
from ..kd import KD_METHODS, method_hparams
from ..models import MODELS
from ..training.objectives import REFRESH_STEPS, UPDATES, StopTraining
from ..study.pipelines import PARAMETERS
from ..study.recipes import finetune_mcmi, finetune_teacher, train_student, train_teacher
from ..training.teacher_objectives import TEACHER_OBJECTIVES, teacher_objective_hparams
from ..training.loop import COMPILE_MODES, TrainConfig
from ..utils import check_float, check_int, get_device, write_json

OBJECTIVES = (*TEACHER_OBJECTIVES, "kd")
#: the objectives weighted by --lam, and its default (the pipelines' λ)
WEIGHTED = ("mcmi", "cmim", "ncmi")
DEFAULT_LAM = PARAMETERS["lam"].default
#: --epochs when not given: the pipelines' defaults (40 teacher epochs, 5 fine-tune epochs, 10 student epochs)
DEFAULT_EPOCHS = {"teacher": PARAMETERS["teacher_epochs"].default, "finetune": PARAMETERS["finetune_epochs"].default,
                  "kd": PARAMETERS["student_epochs"].default}
#: teacher hyper-parameters with their own option (not --hparam)
_OWN_FLAGS = ("lam", "target_cmi", "update", "refresh_steps", "label_smoothing", "centroids")
LAUNCHER_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")


# ---- joining the process group ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    owned: bool = False  # this call created the process group (and so may destroy it)


def under_torchrun() -> bool:
    """True inside a process that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Outside torchrun (or with WORLD_SIZE=1) nothing is initialised. The device is `device`, else cuda:LOCAL_RANK when
    CUDA is there, else the CPU; the backend is nccl for CUDA and gloo otherwise, unless `backend` says.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo(0, 1, 0, get_device(device), None)
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} is not accepted: this node has {torch.cuda.device_count()} "
                             f"CUDA device(s); start at most that many processes per node (--nproc)")
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    owned = not dist.is_initialized()
    if owned:
        kwargs = {"device_id": dev} if backend == "nccl" else {}  # binds NCCL to this rank's GPU up front
        dist.init_process_group(backend, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), owned)


# ---- launching: a subprocess, under torchrun when there are several processes ----------------------------------

def torchrun_command(train_args: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The `python -m torch.distributed.run ... -m mcmi_lab.cli.train train ...` command line for `train_args`."""
    check_int("nproc", nproc, minimum=1)
    check_int("nnodes", nnodes, minimum=1)
    check_int("node_rank", node_rank, minimum=0, maximum=nnodes - 1)
    if nnodes > 1 and not master_addr:
        raise ValueError(f"nnodes={nnodes} needs master_addr: the address of node 0, the same on every node")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1 and master_addr is None and master_port is None:
        cmd.append("--standalone")  # a free local port, no rendezvous to set up
    else:
        cmd += [f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                f"--master_port={master_port or 29500}"]
    return cmd + ["-m", "mcmi_lab.cli.train", "train", *train_args]


def launch_training(args: Sequence[str], nproc: int = 1, *, nnodes: int = 1, node_rank: int = 0,
                    master_addr: str | None = None, master_port: int | None = None, capture: bool = True,
                    check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``train`` with `args` in a subprocess (under torchrun when nproc or nnodes > 1), e.g. from a notebook:

        launch_training(["--data", "fashion-mnist", "--epochs", "5", "--out", "runs/t"], nproc=2)

    capture: keep stdout/stderr (text) in the result. check: raise RuntimeError with the output's tail on failure.
    """
    args = list(args)[1:] if args and args[0] == "train" else list(args)
    if nproc == 1 and nnodes == 1:
        cmd = [sys.executable, "-m", "mcmi_lab.cli.train", "train", *args]
    else:
        cmd = torchrun_command(args, nproc, nnodes, node_rank, master_addr, master_port)
    proc = subprocess.run(cmd, capture_output=capture, text=True, env=env)
    if check and proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:])
        raise RuntimeError(f"training failed with exit status {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


# ---- the `train` command ----------------------------------------------------------------------------------------

def _typed(check, name: str, *bounds, **kw):
    """An argparse type that reports the library's one-line message (argparse hides a plain ValueError's)."""
    def parse(text: str):
        try:
            value = int(text) if check is check_int else float(text)
        except ValueError:
            value = text
        try:
            return check(name, value, *bounds, **kw)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _default(recipe, name: str):
    return inspect.signature(recipe).parameters[name].default


def add_train_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` command to an argparse `subparsers` (``mcmi-lab train``); returns its parser."""
    p = subparsers.add_parser("train", help="train a teacher (mll, mse, cmim, ...), fine-tune it (--teacher; mcmi) "
                              "or distil a student (kd); --nproc N for DistributedDataParallel", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, pos_float = (lambda n: _typed(check_int, n, 1)), (lambda n: _typed(check_float, n, 0.0, low_open=True))
    g = p.add_argument_group("what to train")
    g.add_argument("--objective", choices=OBJECTIVES, default="mll", help="a teacher objective "
                   f"({', '.join(TEACHER_OBJECTIVES)}): trains --model from scratch, or fine-tunes --teacher when "
                   "given (mcmi needs --teacher); kd: distil --teacher into --model")
    g.add_argument("--data", choices=sorted(DATASETS), default="fashion-mnist")
    g.add_argument("--data-root", help="directory holding the data set files")
    g.add_argument("--model", choices=list(MODELS), help=f"architecture (default {_default(train_teacher, 'model')} "
                   f"(mll), {_default(train_student, 'model')} (kd); mcmi: the teacher's)")
    g.add_argument("--width", type=pos_int("--width"), help="width of cnn_small / cnn_tiny")
    g.add_argument("--teacher", type=Path, help="model.pt of the teacher (mcmi: the model fine-tuned; kd: distilled)")
    dose = g.add_mutually_exclusive_group()
    dose.add_argument("--lam", type=_typed(check_float, "--lam", 0.0), help="mcmi: a fixed λ of CE − λ·KL; cmim, "
                      f"ncmi: the weight of their CMI term (default {DEFAULT_LAM}, the pipelines' λ)")
    dose.add_argument("--target-cmi", type=pos_float("--target-cmi"), metavar="NATS", help="mcmi: the dose "
                      "instead of λ: λ is adapted so that the train CMI reaches NATS (in (0, log K))")
    g.add_argument("--update", choices=UPDATES, default=UPDATES[0], help="mcmi, cmim, ncmi: centroid update")
    g.add_argument("--refresh-steps", type=pos_int("--refresh-steps"), default=None,
                   help=f"mcmi, update running: steps between centroid refreshes (default {REFRESH_STEPS})")
    g.add_argument("--method", default="kd", help=f"kd: KD method ({', '.join(KD_METHODS)}; default kd)")
    g.add_argument("--temperature", type=pos_float("--temperature"), help="kd: temperature (default 4)")
    g.add_argument("--hparam", nargs=2, action="append", metavar=("NAME", "VALUE"), help="a hyper-parameter of "
                   "the KD method or the teacher objective, e.g. --hparam temperatures '[1, 4]' (repeatable)")
    g.add_argument("--label-smoothing", type=_typed(check_float, "--label-smoothing", 0.0, 1.0, high_open=True),
                   help="mll, label_smoothing: label smoothing (default 0 and 0.1)")
    g.add_argument("--keep-epochs", nargs="+", type=pos_int("--keep-epochs"), default=[], metavar="N",
                   help="a teacher from scratch: also save the weights after these epochs as <out>/model_epoch<N>.pt "
                   "(early-stopped teachers of the same run, Cho & Hariharan 2019)")
    g = p.add_argument_group("data views")
    g.add_argument("--subset", type=pos_int("--subset"), help="train on N samples (smoke runs)")
    g.add_argument("--fraction", type=_typed(check_float, "--fraction", 0.0, 1.0, low_open=True), default=1.0,
                   help="few-shot: a stratified fraction of the training set")
    g.add_argument("--omit", nargs="+", default=[], metavar="CLASS", help="zero-shot: classes left out of training")
    g.add_argument("--eval-subset", type=pos_int("--eval-subset"), help="evaluate on N test samples")
    g.add_argument("--no-eval", action="store_true", help="no test-set evaluation")
    g = p.add_argument_group("optimisation")
    # defaults: the recipe's (recipes.train_teacher, finetune_mcmi, train_student), read from their signatures
    g.add_argument("--epochs", type=pos_int("--epochs"), help=f"default: the pipelines' {DEFAULT_EPOCHS['teacher']} "
                   f"for a teacher from scratch, {DEFAULT_EPOCHS['finetune']} for a fine-tune (mcmi, --teacher), "
                   f"{DEFAULT_EPOCHS['kd']} for a student (kd): minutes on a CPU with --subset; the paper's recipe "
                   f"is {_default(train_teacher, 'epochs')} / {_default(finetune_mcmi, 'epochs')} / 240")
    g.add_argument("--batch-size", type=pos_int("--batch-size"), help=f"per process (default {TrainConfig.batch_size})")
    g.add_argument("--lr", type=pos_float("--lr"), help=f"default {TrainConfig.lr}")
    g.add_argument("--schedule", choices=("step", "cosine", "constant"),
                   help=f"default {_default(finetune_mcmi, 'schedule')} (mcmi), else {TrainConfig.schedule}")
    g.add_argument("--weight-decay", type=_typed(check_float, "--weight-decay", 0.0),
                   help=f"default {TrainConfig.weight_decay}")
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), help=f"default {TrainConfig.precision}")
    g.add_argument("--seed", type=_typed(check_int, "--seed", 0), default=0)
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK, else cpu)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    g.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="torch.compile the training forward in this mode (default: off; reduce-overhead = CUDA graphs)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, model.pt, results.json")
    g.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt")
    g = p.add_argument_group("processes (torchrun)")
    g.add_argument("--nproc", type=pos_int("--nproc"), default=1, help="processes on this node (GPUs)")
    g.add_argument("--nnodes", type=pos_int("--nnodes"), default=1)
    g.add_argument("--node-rank", type=_typed(check_int, "--node-rank", 0), default=0)
    g.add_argument("--master-addr", help="address of node 0 (multi-node)")
    g.add_argument("--master-port", type=_typed(check_int, "--master-port", 1, 65535))
    p.set_defaults(func=train_command)
    return p


def train_argv(args: argparse.Namespace) -> list[str]:
    """The command line of `args` without the launcher options (what each torchrun worker receives)."""
    probe = argparse.ArgumentParser()
    add_train_command(probe.add_subparsers(dest="command"))
    own = set(vars(probe.parse_args(["train", "--out", "."]))) - set(LAUNCHER_OPTIONS) - {"func", "command"}
    out: list[str] = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key not in own or value is None or value is False or value == []:
            continue
        if value is True:
            out.append(flag)
        elif key == "hparam":
            for name, v in value:
                out += [flag, name, v]
        else:
            out += [flag, *map(str, value if isinstance(value, list) else [value])]
    return out


def check_train_args(args: argparse.Namespace) -> None:
    """Cross-option checks: one ValueError line naming the option, the value and what is accepted."""
    if args.objective in ("mcmi", "kd") and args.teacher is None:
        raise ValueError(f"--objective {args.objective} needs --teacher PATH (a model.pt written by train)")
    if args.objective not in WEIGHTED and args.lam is not None:
        raise ValueError(f"--lam is not accepted with --objective {args.objective}: it weighs the CMI term of "
                         f"--objective {', '.join(WEIGHTED)}")
    if args.objective != "mcmi" and args.target_cmi is not None:
        raise ValueError(f"--target-cmi is not accepted with --objective {args.objective}: it sets the dose of "
                         "--objective mcmi")
    if args.objective != "kd" and (args.method != "kd" or args.temperature is not None):
        raise ValueError("--method and --temperature are not accepted with --objective "
                         f"{args.objective}: they configure --objective kd")
    if args.objective not in ("mll", "label_smoothing") and args.label_smoothing is not None:
        raise ValueError(f"--label-smoothing is not accepted with --objective {args.objective}: expected --objective "
                         "mll or label_smoothing")
    if args.objective in TEACHER_OBJECTIVES:
        accepted = [k for k in teacher_objective_hparams(args.objective) if k not in _OWN_FLAGS]
        for name, value in args.hparam or []:
            if name not in accepted:
                raise ValueError(f"--hparam {name} {value} is not accepted for --objective {args.objective}: expected "
                                 f"one of {', '.join(accepted) or '(none)'} (λ is --lam, label smoothing --label-smoothing, the centroid update --update)")
    if args.objective == "kd":
        if args.method not in KD_METHODS:
            raise ValueError(f"--method {args.method} is not accepted: expected one of {', '.join(KD_METHODS)}")
        accepted = method_hparams(args.method)
        if args.temperature is not None and "temperature" not in accepted:
            raise ValueError(f"--temperature is not accepted for --method {args.method}: it has no fixed temperature")
        for name, value in args.hparam or []:
            if name not in accepted or name == "temperature":
                raise ValueError(f"--hparam {name} {value} is not accepted for --method {args.method}: expected one of "
                                 f"{', '.join(k for k in accepted if k != 'temperature') or '(none)'} "
                                 "(the temperature is --temperature)")
    if args.refresh_steps is not None and (args.objective not in WEIGHTED or args.update != "running"):
        raise ValueError(f"--refresh-steps is not accepted with --objective {args.objective} --update {args.update}: "
                         f"it sets how often --objective {'/'.join(WEIGHTED)} --update running refreshes the centroids")
    if args.keep_epochs and (args.objective not in TEACHER_OBJECTIVES or args.teacher is not None):
        raise ValueError(f"--keep-epochs is not accepted with --objective {args.objective}"
                         f"{' --teacher' if args.teacher is not None else ''}: it keeps epochs of a teacher trained "
                         "from scratch")
    if args.teacher is not None and not Path(args.teacher).is_file():
        raise FileNotFoundError(f"--teacher {str(args.teacher)!r} does not exist: expected a model.pt written by train")
    if args.nnodes > 1 and not args.master_addr:
        raise ValueError(f"--nnodes {args.nnodes} needs --master-addr: the address of node 0")
    if args.node_rank >= args.nnodes:
        raise ValueError(f"--node-rank={args.node_rank} is not accepted: expected an integer in [0, {args.nnodes - 1}]")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file: expected a folder (created if missing) for checkpoint.pt, "
                         "model.pt and results.json")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} cannot be written: {str(parent)!r} is not writable by this user")
    if not args.resume and (out / "checkpoint.pt").exists():
        raise ValueError(f"--out {str(args.out)!r} already holds checkpoint.pt: pass --resume to continue it, or "
                         "choose another --out")


def train_command(args: argparse.Namespace) -> int:
    """``train``: re-executes under torchrun when asked for several processes, else trains here; exit status."""
    check_train_args(args)
    if (args.nproc > 1 or args.nnodes > 1) and not under_torchrun():
        cmd = torchrun_command(train_argv(args), args.nproc, args.nnodes, args.node_rank, args.master_addr,
                               args.master_port)
        print("launching:", " ".join(cmd), flush=True)
        return subprocess.run(cmd).returncode
    run_training(args)
    return 0


def run_training(args: argparse.Namespace) -> dict:
    """Train as `args` say in this process (one rank of torchrun, or alone); rank 0 writes the artifacts."""
    info = init_distributed(args.device)
    try:
        return _train(args, info)
    finally:
        if info.owned and dist.is_initialized():
            dist.destroy_process_group()


def _load_data(args, rank: int):
    for turn in (0, 1):  # rank 0 first: it may lay out the cache that the others then read
        if (rank == 0) == (turn == 0):
            train = load_dataset(args.data, "train", root=args.data_root)
            test = None if args.no_eval else load_dataset(args.data, "test", root=args.data_root)
        dist_utils.barrier()
    if args.subset:
        train = subset(train, min(args.subset, len(train)), seed=args.seed)
    if args.fraction < 1:
        train = few_shot(train, args.fraction, seed=args.seed)
    if args.omit:
        train = omit_classes(train, [int(c) if c.lstrip("-").isdigit() else c for c in args.omit])
    if test is not None and args.eval_subset:
        test = subset(test, min(args.eval_subset, len(test)), seed=args.seed)
    return train, test


def _fit_options(args, info: DistInfo) -> dict:
    """The TrainConfig fields this command line sets; the recipe's defaults stand for the others."""
    given = {"batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule,
             "weight_decay": args.weight_decay, "precision": args.precision, "compile": args.compile}
    options = {k: v for k, v in given.items() if v is not None}
    return {**options, "augment": not args.no_augment, "sync_bn": args.sync_bn, "device": str(info.device)}


def _teacher(args, data, device):
    teacher = load_model(args.teacher, device)
    if teacher.spec["num_classes"] != data.num_classes:
        raise ValueError(f"--teacher {str(args.teacher)!r} has {teacher.spec['num_classes']} classes: expected "
                         f"{data.num_classes}, the classes of --data {args.data}")
    if args.objective != "kd" and args.model is not None and args.model != teacher.spec["name"]:
        raise ValueError(f"--model {args.model} is not accepted with --objective {args.objective} --teacher: the model "
                         f"fine-tuned is the teacher ({teacher.spec['name']})")
    return teacher


def _run_recipe(args, train, test, info: DistInfo):
    """The recipe of --objective: train_teacher (a teacher objective), finetune_teacher (one with --teacher),
    finetune_mcmi (mcmi) or train_student (kd). -> (model, hist)"""
    common = {"seed": args.seed, "eval_data": test, "checkpoint": Path(args.out) / "checkpoint.pt",
              "resume": args.resume, **_fit_options(args, info)}
    stage = "kd" if args.objective == "kd" else "finetune" if args.teacher is not None else "teacher"
    common["epochs"] = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[stage]
    width = {} if args.width is None else {"model_kwargs": {"width": args.width}}
    hparams = {name: _value(v) for name, v in (args.hparam or [])}
    if args.objective in TEACHER_OBJECTIVES:
        if args.label_smoothing is not None:
            hparams["label_smoothing"] = args.label_smoothing
        if args.objective in WEIGHTED and args.target_cmi is None:
            hparams["lam"] = DEFAULT_LAM if args.lam is None else args.lam
        if args.objective in WEIGHTED:
            hparams.update(update=args.update, refresh_steps=args.refresh_steps)
    if args.objective in TEACHER_OBJECTIVES and args.teacher is None:
        return train_teacher(train, args.model or "cnn_small", objective=args.objective, keep_epochs=args.keep_epochs,
                             keep_dir=Path(args.out), **width, **hparams, **common)
    teacher = _teacher(args, train, info.device)
    if args.objective == "mcmi":  # the controller's options (--hparam control_gain 0.5) go in `control`
        own = inspect.signature(finetune_mcmi).parameters
        control = {k: hparams.pop(k) for k in list(hparams) if k not in own}
        return finetune_mcmi(teacher, train, target_cmi=args.target_cmi, control=control, **hparams, **common)
    if args.objective in TEACHER_OBJECTIVES:
        return finetune_teacher(teacher, train, args.objective, **hparams, **common)
    if args.temperature is not None:
        hparams["temperature"] = args.temperature
    model = {} if args.model is None else {"model": args.model}
    return train_student(teacher, train, args.method, **model, **width, **hparams, **common)


def _train(args, info: DistInfo) -> dict:
    out = Path(args.out)
    train, test = _load_data(args, info.rank)
    if info.rank == 0:
        print(f"train {args.objective}: {len(train)} {train.name} images, {info.world_size} process(es) on "
              f"{info.device} ({info.backend or 'no process group'}), out {out}", flush=True)
    model, history = _run_recipe(args, train, test, info)
    # rank 0 alone writes the results, so it alone evaluates (every rank holds the same weights after fit)
    metrics = evaluate(model, test) if test is not None and info.rank == 0 else None
    results = {"objective": args.objective, "method": args.method if args.objective == "kd" else None,
               "data": args.data, "train_size": len(train), "model": dict(model.spec),
               "teacher": str(args.teacher) if args.teacher else None, "world_size": info.world_size,
               "backend": info.backend, "device": str(info.device), "config": load_checkpoint(out / "checkpoint.pt")["config"],
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
               "history": history, "test": metrics}
    if info.rank == 0:
        save_model(out / "model.pt", model)
        write_json(out / "results.json", results)
        summary = f"test accuracy {metrics['accuracy']:.4f}, CMI {metrics['cmi']:.4f}; " if metrics else ""
        print(f"{summary}wrote {out / 'model.pt'} and {out / 'results.json'}", flush=True)
    dist_utils.barrier()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mcmi_lab.cli.train train ...``; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m mcmi_lab.cli.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, StopTraining) as err:  # disk full, an --out that cannot be written, the collapse guard
        print(f"{parser.prog} {args.command}: {'training stopped' if isinstance(err, StopTraining) else 'error'}: "
              f"{err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
