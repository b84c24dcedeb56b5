"""torch.distributed on CPU (gloo, 2 processes): the metrics equal the single-process ones, training shards the data,
keeps the ranks identical and lets rank 0 alone write; the torchrun launcher end to end."""
import argparse
import copy
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import random_images
from mcmi_lab.cli import train as launch
from mcmi_lab.training.checkpoint import load_checkpoint, load_model
from mcmi_lab.training.evaluate import evaluate, measure_cmi
from mcmi_lab.kd import build_objective
from mcmi_lab.models import build_model
from mcmi_lab.training.loop import fit
from mcmi_lab.training.objectives import Objective, kd_objective, mcmi_objective

FAST = dict(progress="off", batch_size=16, precision="fp32", device="cpu")  # the same on a GPU machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Float64(nn.Module):
    """A model evaluated in float64, so that sharded and single-process sums agree to rounding (~1e-15)."""

    def __init__(self, net):
        super().__init__()
        self.net = net.double()

    def forward(self, x):
        return self.net(x.double())


def _measured_model():
    torch.manual_seed(2)
    model = Float64(build_model("cnn_tiny", 4, 1, width=4))
    data = random_images(101, k=4)
    with torch.no_grad():  # BatchNorm statistics of the data and larger logits: outputs that differ, CMI ≈ 0.18
        model.net.fc.weight.mul_(30)
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None  # running statistics = this one batch's
        model.train()(data.normalize(data.images))
    return model.eval()


class Connector(Objective):
    """An objective with its own parameter (like a FitNet regressor) that records which samples this rank saw."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = []

    def on_epoch_start(self, model, data, epoch):
        self.epoch = epoch

    def forward(self, model, images, labels, index=None):
        if self.epoch == 0:
            self.seen += index.tolist()
        logits = model(images) * self.scale
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, {"ce": loss.detach(), "acc": (logits.argmax(1) == labels).float().mean()}


def _worker(rank, world, port, tmp):
    from mcmi_lab.training import loop as train_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = launch.init_distributed("cpu")
    out = {"info": (info.rank, info.world_size, info.backend)}

    data = random_images(101, k=4)  # 101: the shards are 50 and 51, no padding sample may count twice
    model = _measured_model()
    m = measure_cmi(model, data, batch_size=16)
    out["measure"] = {k: m[k] for k in ("cmi", "per_class_cmi", "separation", "centroids", "count")}
    out["measure"]["accuracy"] = m["accuracy"]
    out["evaluate"] = evaluate(model, data, batch_size=16)

    saves = []
    real_save = train_module.save_checkpoint
    train_module.save_checkpoint = lambda *a, **k: (saves.append(rank), real_save(*a, **k))[1]
    blobs = random_images(256, k=4, seed=1)
    torch.manual_seed(0)
    net = build_model("cnn_tiny", 4, 1, width=4)
    objective = Connector()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        hist = fit(net, blobs, objective, epochs=4, lr=0.05, schedule="constant", eval_data=data,
                   checkpoint=tmp / "mll.pt", **FAST)
    out.update(log=log.getvalue(), history=hist, saves=saves, seen=objective.seen, scale=objective.scale.detach(),
               weights={k: v.clone() for k, v in net.state_dict().items()})

    mcmi = mcmi_objective(0.2, update="ema", ema_decay=0.5)
    fit(net, blobs, mcmi, epochs=1, lr=0.01, log=False, **FAST)
    out["centroids"] = mcmi.centroids.clone()
    running = mcmi_objective(0.2, update="running")
    fit(copy.deepcopy(net), blobs, running, epochs=1, lr=0.01, log=False, **FAST)
    out["running_centroids"] = running.centroids.clone()

    teacher, before = net, {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    student = build_model("cnn_tiny", 4, 1, width=4)
    fit(student, blobs, kd_objective(teacher), epochs=1, log=False, **FAST)
    out["teacher_unchanged"] = all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    out["teacher_training"] = teacher.training
    out["student"] = {k: v.clone() for k, v in student.state_dict().items()}

    torch.manual_seed(2)
    crd = build_objective("crd", teacher, nce_k=8)
    fit(build_model("cnn_tiny", 4, 1, width=4), blobs, crd, epochs=1, log=False, **FAST)
    fresh = build_objective("crd", teacher, nce_k=8)
    fresh.prepare(build_model("cnn_tiny", 4, 1, width=4), blobs)  # the bank before any step
    out["crd"] = {"memory_s": crd.memory_s.clone(), "memory_t": crd.memory_t.clone(),
                  "normalizers": crd.normalizers.clone(),
                  "rows_updated": int(((crd.memory_s - fresh.memory_s).abs().sum(1) > 0).sum())}

    try:
        fit(build_model("cnn_tiny", 4, 1, width=4), blobs, epochs=1, sync_bn=True, log=False, **FAST)
    except ValueError as err:
        out["sync_bn_error"] = str(err)
    torch.save(out, tmp / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_process_group_is_gloo_on_cpu(two_ranks):
    _, ranks = two_ranks
    assert [r["info"] for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_measure_cmi_equals_single_process(two_ranks):
    _, ranks = two_ranks
    data = random_images(101, k=4)
    single = measure_cmi(_measured_model(), data, batch_size=1000)
    assert single["cmi"] > 1e-4  # not a degenerate zero
    for r in ranks:
        got = r["measure"]
        assert abs(float(got["cmi"]) - float(single["cmi"])) < 1e-12
        assert abs(float(got["separation"]) - float(single["separation"])) < 1e-12
        assert torch.allclose(got["per_class_cmi"], single["per_class_cmi"], rtol=0, atol=1e-12)
        assert torch.allclose(got["centroids"], single["centroids"], rtol=0, atol=1e-14)
        assert got["accuracy"] == single["accuracy"]
        assert got["count"].tolist() == data.class_counts().double().tolist()  # every sample exactly once


def test_evaluate_counts_every_sample_once(two_ranks):
    _, ranks = two_ranks
    single = evaluate(_measured_model(), random_images(101, k=4))
    for r in ranks:
        got = r["evaluate"]
        assert got["n"] == 101 and sum(map(sum, got["confusion"])) == 101
        assert got["confusion"] == single["confusion"] and got["accuracy"] == single["accuracy"]
        assert abs(got["cmi"] - single["cmi"]) < 1e-12


def test_training_shards_the_data_and_makes_progress(two_ranks):
    _, (r0, r1) = two_ranks
    assert len(r0["seen"]) == len(r1["seen"]) == 128 and not set(r0["seen"]) & set(r1["seen"])
    hist = [{k: v for k, v in r.items() if k != "time"} for r in r0["history"]]
    assert hist == [{k: v for k, v in r.items() if k != "time"} for r in r1["history"]]  # reduced over the ranks
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert hist[-1]["train_acc"] > 0.5 and hist[-1]["eval_acc"] > 0.5  # chance: 0.25


def test_ranks_stay_identical(two_ranks):
    _, (r0, r1) = two_ranks
    for name, value in r0["weights"].items():  # parameters (DDP) and BatchNorm buffers (broadcast per epoch)
        assert torch.equal(value, r1["weights"][name]), name
    assert torch.equal(r0["scale"], r1["scale"]) and float(r0["scale"]) != 1.0  # objective parameters averaged
    assert torch.equal(r0["centroids"], r1["centroids"])  # EMA centroids from the global batch
    assert torch.equal(r0["running_centroids"], r1["running_centroids"])  # the epoch's class means over both ranks
    for name in ("memory_s", "memory_t", "normalizers"):  # CRD: every rank's bank takes every rank's embeddings
        assert torch.equal(r0["crd"][name], r1["crd"][name]), name
    assert r0["crd"]["rows_updated"] == r1["crd"]["rows_updated"] == 256  # both shards' samples, on both ranks
    for name, value in r0["student"].items():
        assert torch.equal(value, r1["student"][name]), name


def test_rank_zero_alone_writes_checkpoints_and_logs(two_ranks):
    tmp, (r0, r1) = two_ranks
    assert r0["saves"] == [0, 0, 0, 0] and r1["saves"] == []
    state = load_checkpoint(tmp / "mll.pt")
    assert state["epoch"] == 4
    for name, value in state["model"].items():
        assert torch.equal(value, r0["weights"][name]), name
    assert r0["log"].count("epoch ") == 4 and "epoch 4/4" in r0["log"] and r1["log"] == ""
    assert not list(tmp.glob(".*.tmp"))


def test_kd_teacher_is_frozen_and_not_wrapped(two_ranks):
    _, ranks = two_ranks
    assert all(r["teacher_unchanged"] and not r["teacher_training"] for r in ranks)


def test_sync_bn_on_cpu_is_one_clear_line(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert r["sync_bn_error"].startswith("sync_bn=True is not accepted on device 'cpu': SyncBatchNorm needs CUDA")


# ---- the launcher ---------------------------------------------------------------------------------------------------

def test_torchrun_launcher_trains_resumes_and_writes_on_rank_zero(tmp_path):
    from mcmi_lab.data.registry import fashion_mnist_root

    fashion_mnist_root(download=False)  # the data must be here (`make data`); fails with the three ways to get it
    out = tmp_path / "run"
    args = ["--data", "fashion-mnist", "--subset", "768", "--eval-subset", "400", "--model", "cnn_tiny", "--width", "4",
            "--batch-size", "32", "--lr", "0.1", "--schedule", "constant", "--precision", "fp32", "--device", "cpu",
            "--out", str(out)]
    first = launch.launch_training(args + ["--epochs", "2"], nproc=2)
    assert first.stdout.count("epoch 1/2") == 1, first.stdout  # rank 0 logs, rank 1 does not
    assert "2 process(es) on cpu (gloo)" in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["backend"] == "gloo" and len(results["history"]) == 2
    assert results["test"]["n"] == 400

    again = launch.launch_training(args + ["--epochs", "3", "--resume"], nproc=2)
    assert "resumed from" in again.stdout and again.stdout.count("epoch 3/3") == 1, again.stdout
    results = json.loads((out / "results.json").read_text())
    hist = results["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3] and hist[-1]["loss"] < hist[0]["loss"]
    # 10 classes: chance is 0.1. Width 4, 3 epochs at a constant lr 0.1 is a weak model: the same run in one
    # process reaches 0.29 (train accuracy 0.43; BatchNorm's running statistics lag), 2 ranks 0.255
    assert results["test"]["accuracy"] > 0.2
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3
    model = load_model(out / "model.pt")
    assert model.spec == {"name": "cnn_tiny", "num_classes": 10, "in_channels": 1, "width": 4}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model.pt", "results.json"]


def test_torchrun_command_single_and_multi_node():
    single = launch.torchrun_command(["--epochs", "5"], 4)
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1", "--standalone",
                          "-m", "mcmi_lab.cli.train", "train", "--epochs", "5"]
    multi = launch.torchrun_command(["--out", "runs/x"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                    master_port=29400)
    assert multi[3:9] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                          "--master_port=29400", "-m"]
    with pytest.raises(ValueError, match="nnodes=2 needs master_addr"):
        launch.torchrun_command([], 2, nnodes=2)
    with pytest.raises(ValueError, match=r"node_rank=2 is not accepted: expected an integer in \[0, 1\]"):
        launch.torchrun_command([], 2, nnodes=2, node_rank=2, master_addr="h")


def _parse(argv):
    parser = argparse.ArgumentParser()
    launch.add_train_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_worker_command_line_round_trips_without_launcher_options():
    argv = ["--objective", "kd", "--teacher", "t.pt", "--model", "cnn_tiny", "--epochs", "3", "--omit", "3", "Coat",
            "--hparam", "beta", "100", "--sync-bn", "--resume", "--out", "runs/x", "--nproc", "4", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29400"]
    args = _parse(argv)
    worker = launch.train_argv(args)
    assert not {"--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port"} & set(worker)
    again = vars(_parse(worker))
    expected = {k: v for k, v in vars(args).items() if k not in launch.LAUNCHER_OPTIONS}
    assert {k: v for k, v in again.items() if k not in launch.LAUNCHER_OPTIONS} == expected


def test_init_distributed_outside_torchrun_is_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    info = launch.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.owned) == (0, 1, None, False)
    assert not launch.under_torchrun() and not torch.distributed.is_initialized()
