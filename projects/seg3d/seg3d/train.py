"""Training: MONAI all the way, fast on a GPU, the same code on CPU, and nothing lost.

The loop follows MONAI's fast-training guide: ``CacheDataset`` keeps the deterministic part of
the chain in memory (on the GPU when there is one, so random crops and augmentation run
there), ``ThreadDataLoader`` avoids worker processes, mixed precision and
``cudnn.benchmark`` on CUDA. Every epoch logs its metrics through ``mlpipe.log`` (batched, so
logging costs the loop nothing measurable); ``checkpoints/last.pt`` goes into the run on a
better ``val_dice``, at the end, and at most every ``checkpoint_every_s`` seconds between
(:func:`checkpoint_due`), so a crash or Ctrl-C keeps a recent epoch; ``resume_from``
continues from one with the optimizer state. With ``nproc > 1`` the same command relaunches
itself under torchrun (DDP); rank 0 alone logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg3d.config import Seg3dInputError, TrainConfig
from seg3d.schedule import PolySchedule

if TYPE_CHECKING:
    import torch

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "seg3d.checkpoint/1"
VALIDATIONS_PER_BUDGET = 10
"""With ``max_minutes`` and ``val_every`` 0: validate about this many times over the budget."""


@dataclass
class TrainResult:
    run_id: str | None
    epochs_done: int
    best_val_dice: float
    best_epoch: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    loop_seconds: float = 0.0
    """Wall time of the epochs: training, validation, logging and checkpoints."""
    model_uri: str | None = None
    registered_version: str | None = None


def train_entry(config: TrainConfig, *, evaluate_after: bool = False) -> TrainResult | None:
    """The ``train``/``main`` entry point: relaunch under torchrun for DDP, else train here."""
    if config.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_under_torchrun(config.nproc)
    result = train(config)
    if result.run_id is None:  # a DDP rank other than 0: it logs nothing
        return result
    if evaluate_after and result.model_uri:
        from seg3d.evaluate import evaluate

        evaluate(result.model_uri, config.data_dir)
    _print_summary(result)
    return result


def train(config: TrainConfig, *, log: bool = True) -> TrainResult:
    """Train ``config.epochs`` epochs (or until ``max_minutes``); log each, checkpoint as due.

    Args:
        config: checked settings.
        log: False turns every tracking call off (the benchmark's baseline); checkpoints are
            then written to a temporary folder only.

    Raises:
        Seg3dInputError, DatasetError: bad parameters or data, before any training step.
    """
    import torch
    from monai.data import CacheDataset, ThreadDataLoader, partition_dataset
    from monai.utils import set_determinism

    from seg3d.checks import split_cases
    from seg3d.planning import log_plan, print_plan
    from seg3d.prepare import prepare
    from seg3d.transforms import infer_transforms, train_transforms, val_transforms

    dist = _Distributed.start()
    config.nproc = dist.world  # workers under torchrun are not given --nproc
    tracking = log and dist.rank == 0
    device = dist.device
    cuda = device.type == "cuda"
    set_determinism(seed=config.seed + dist.rank)
    if cuda:
        torch.backends.cudnn.benchmark = True

    # all before a run is started or anything logged (the ``check`` entry point does the same)
    prepared = prepare(config)
    data_dir, info, planned = prepared.data_dir, prepared.info, prepared.planned
    version = config.dataset_version or None
    if dist.rank == 0:
        print_plan(planned)
    run_id = None
    if tracking:
        import mlflow

        import mlpipe.log as mlog

        active = mlflow.active_run() or mlflow.start_run(log_system_metrics=True)
        run_id = active.info.run_id
        info = mlog.dataset(data_dir, version=version)  # hashes cached: no file read again
        log_plan(planned)
    train_pairs, val_pairs = split_cases(info.pairs, config.val_fraction, config.seed)
    items = [{"image": str(p.image), "label": str(p.label)} for p in train_pairs]
    if dist.world > 1:
        items = partition_dataset(
            items, num_partitions=dist.world, shuffle=True, even_divisible=True, seed=config.seed
        )[dist.rank]
    val_items = [{"image": str(p.image), "label": str(p.label)} for p in val_pairs]
    if dist.world > 1:
        # every rank validates its share; MONAI's metrics gather the scores across ranks
        # (equal shares: the few repeated cases are the price of a collective that cannot hang)
        val_items = partition_dataset(
            val_items, num_partitions=dist.world, shuffle=False, even_divisible=True
        )[dist.rank]

    data_device = str(device) if cuda else "cpu"
    train_tf = train_transforms(config, device=data_device)
    val_tf = val_transforms(config, device=data_device)
    if tracking:
        mlog.preprocessing(train_tf, name="train")
        mlog.preprocessing(val_tf, name="val")
        mlog.preprocessing(infer_transforms(config), name="infer")
        mlog.data_profile(info, max_volumes=50)
        mlog.params(_flat_params(config, len(train_pairs), len(val_pairs), data_dir))

    # Cached on the device (GPU) once; worker processes cannot share CUDA tensors, so threads.
    workers = 0 if cuda else min(2, os.cpu_count() or 1)
    train_ds = CacheDataset(
        items, train_tf, cache_rate=config.cache_rate, num_workers=workers, progress=False
    )
    val_ds = CacheDataset(
        val_items, val_tf, cache_rate=config.cache_rate, num_workers=workers, progress=False
    )
    loader = ThreadDataLoader(train_ds, batch_size=config.batch_size, shuffle=True, num_workers=0)
    val_loader = ThreadDataLoader(val_ds, batch_size=1, num_workers=0)

    model, optimizer, scheduler, scaler = _build(config, device, dist)
    start_epoch, best, best_epoch = 0, -1.0, -1
    if config.resume_from:
        start_epoch, best, best_epoch = _resume(
            config.resume_from, model, optimizer, scheduler, scaler, device
        )
        if tracking:
            mlflow.set_tag("seg3d.resumed_from", _safe_uri(config.resume_from))

    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    checkpoints = Path(tempfile.mkdtemp(prefix="seg3d-ckpt-"))
    # Checkpoints and pictures are written and uploaded by one background thread, in order,
    # so the GPU does not wait for the disk or the server; it is drained before the model is
    # logged, and at interpreter exit after a crash or Ctrl-C, so what was queued is kept.
    writer = _Writer()
    began = time.monotonic()
    saved_at: float | None = None  # when the last checkpoint was handed to the writer
    history: list[dict] = []
    stopped_early = False
    epoch = start_epoch - 1
    budget_s = 60.0 * config.max_minutes
    validated_at = began
    progress = _Progress(config.epochs, enabled=dist.rank == 0, budget_s=budget_s)
    for epoch in range(start_epoch, config.epochs):
        if dist.world > 1 and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        spent = (time.monotonic() - began) / budget_s if budget_s > 0 else 0.0
        scheduler.set_progress(max(epoch / config.epochs, spent))
        model.train()
        t0 = time.perf_counter()
        waited, samples, losses = 0.0, 0, []
        batches = len(loader)
        fetch = time.perf_counter()
        for step, batch in enumerate(loader):
            waited += time.perf_counter() - fetch
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=config.amp and cuda):
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
            samples += image.shape[0]
            progress.step(epoch, step + 1, batches)
            fetch = time.perf_counter()
        check_epoch_complete(epoch, len(losses), batches)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        train_loss = dist.mean(train_loss, device)
        samples = int(dist.sum(samples, device))
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "train_loss": train_loss,
            "lr": lr,
            "epoch_seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "data_loading_share": waited / seconds if seconds > 0 else 0.0,
        }
        if cuda:
            row["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        # With a budget, stop when the next epoch would not fit; that last epoch validates, so
        # the best checkpoint has seen the end of the schedule.
        elapsed = time.monotonic() - began
        out_of_time = budget_s > 0 and elapsed + seconds > budget_s
        stop = dist.any(out_of_time, device) and epoch + 1 < config.epochs
        due = (
            (epoch + 1) % config.val_every == 0
            if config.val_every
            else time.monotonic() - validated_at >= budget_s / VALIDATIONS_PER_BUDGET
        )
        if due or stop or epoch + 1 == config.epochs:
            validated_at = time.monotonic()
            scores, picture = _validate(model, val_loader, config, device)
            row.update(scores)
            if tracking and picture is not None:
                image, label, pred = picture
                writer.submit(mlog.overlay, image, label=label, prediction=pred, step=epoch,
                              name="val", spacing=config.spacing, run_id=run_id)  # fmt: skip
        improved = row.get("val_dice", -1.0) > best
        if improved:
            best, best_epoch = row["val_dice"], epoch
        if dist.rank == 0:
            last = epoch + 1 == config.epochs or stop
            if checkpoint_due(config.checkpoint_every_s, saved_at, improved=improved, last=last):
                state = _checkpoint(
                    model, optimizer, scheduler, scaler, config, epoch, best, best_epoch
                )
                writer.submit(_save_checkpoint, state, checkpoints, improved, run_id)
                saved_at = time.monotonic()
            if tracking:
                mlog.metrics(row, step=epoch)
        history.append({"epoch": epoch, **row})
        progress.epoch_done(epoch, row)
        if stop:
            stopped_early = True
            break

    writer.drain()
    result = TrainResult(run_id, epoch + 1, best, best_epoch, stopped_early, history)
    result.loop_seconds = time.monotonic() - began
    if tracking:
        mlflow.set_tags(
            {
                "seg3d.best_epoch": str(best_epoch),
                "seg3d.epochs_done": epoch + 1,
                "seg3d.stopped": "max_minutes" if stopped_early else "epochs",
            }
        )
        mlog.metrics({"best_val_dice": best})
        _log_final_model(result, model, config, checkpoints, info)
        mlog.flush()
    dist.stop()
    return result


# pieces ---------------------------------------------------------------------------------------
def _build(config: TrainConfig, device: torch.device, dist: _Distributed):
    import torch

    from seg3d.networks import build_network

    model = build_network(config).to(device)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-5)
    scheduler = PolySchedule(optimizer, config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    return model, optimizer, scheduler, scaler


def _validate(model, loader, config: TrainConfig, device):
    """Sliding-window Dice per foreground class over the held-out cases, and one picture."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    net = model.module if hasattr(model, "module") else model
    net.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    picture = None
    with torch.no_grad(), torch.autocast(device.type, enabled=config.amp and device.type == "cuda"):
        for batch in loader:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            logits = sliding_window_inference(image, config.patch_size, 4, net, overlap=0.25)
            pred = logits.argmax(dim=1, keepdim=True)
            metric(one_hot(pred, config.num_classes), one_hot(label.long(), config.num_classes))
            if picture is None:  # the first held-out case, as a picture in the UI
                picture = tuple(t[0, 0].float().cpu().numpy() for t in (image, label, pred))
    per_class = metric.aggregate().float().cpu().tolist()
    net.train()
    scores = {f"val_dice_{c + 1}": float(v) for c, v in enumerate(per_class)}
    finite = [v for v in per_class if v == v]
    scores["val_dice"] = float(sum(finite) / len(finite)) if finite else 0.0
    return scores, picture


class _Writer:
    """One background thread for checkpoints and pictures; its errors surface in the loop.

    At most ``backlog`` jobs wait: a disk or server slower than the epochs makes the loop wait
    rather than piling up checkpoint copies in memory.
    """

    def __init__(self, backlog: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seg3d-writer")
        self.jobs: list[Future] = []
        self.backlog = backlog

    def submit(self, fn, *args: Any, **kwargs: Any) -> None:
        self.jobs.append(self.pool.submit(fn, *args, **kwargs))
        while len(self.jobs) > self.backlog:
            self.jobs.pop(0).result()  # raises the job's error here, in the training loop
        for job in [j for j in self.jobs if j.done()]:
            self.jobs.remove(job)
            job.result()

    def drain(self) -> None:
        self.pool.shutdown(wait=True)
        for job in self.jobs:
            job.result()
        self.jobs.clear()


def check_epoch_complete(epoch: int, done: int, expected: int) -> None:
    """MONAI's ``ThreadDataLoader`` ends an epoch early, without an error, when a transform
    fails in its thread (the traceback is only printed); training on part of the data, or on
    none (``train_loss`` NaN), would look like a bad model rather than a broken input.

    Raises:
        RuntimeError: fewer batches than the loader's length.
    """
    if done < expected:
        raise RuntimeError(
            f"epoch {epoch}: the data loader stopped after {done} of {expected} batches; a "
            "transform failed in its thread (its traceback is printed above). Fix the case it "
            "names and run again"
        )


def checkpoint_due(
    every_s: float, saved_at: float | None, *, improved: bool, last: bool, now: float | None = None
) -> bool:
    """Whether this epoch writes ``last.pt`` (and ``best.pt`` when ``improved``).

    Always after the first epoch, a better ``val_dice`` (``best.pt`` is the model that gets
    registered), and the last epoch; otherwise once ``every_s`` seconds have passed since the
    last one. A checkpoint holds the model and the AdamW state (three times the weights):
    writing and uploading one per epoch made short CPU epochs 1.3 times slower than a plain
    MONAI loop (BENCHMARKS.md), while a crash loses at most ``every_s`` seconds of training.
    ``every_s`` 0 writes every epoch.
    """
    if every_s <= 0 or saved_at is None or improved or last:
        return True
    return (time.monotonic() if now is None else now) - saved_at >= every_s


def _save_checkpoint(state: dict, folder: Path, improved: bool, run_id: str | None) -> None:
    """Write ``last.pt`` (and ``best.pt``) and upload them to the run (from the writer thread).

    The run is named explicitly: MLflow's active run is per thread.
    """
    import torch

    torch.save(state, folder / "last.pt.tmp")
    os.replace(folder / "last.pt.tmp", folder / "last.pt")
    names = ["last.pt"]
    if improved:
        shutil.copyfile(folder / "last.pt", folder / "best.pt")
        names.append("best.pt")
    if run_id is not None:
        from mlpipe.log import client_for_active_uri

        client = client_for_active_uri()
        for name in names:
            client.log_artifact(run_id, str(folder / name), CHECKPOINT_DIR)


def _to_cpu(value: Any) -> Any:
    """A copy on the CPU: the writer thread must not see tensors the next step changes."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _checkpoint(model, optimizer, scheduler, scaler, config, epoch, best, best_epoch) -> dict:
    net = model.module if hasattr(model, "module") else model
    return _to_cpu(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "best_val_dice": best,
            "best_epoch": best_epoch,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "config": config.to_dict(),
        }
    )


def _resume(uri: str, model, optimizer, scheduler, scaler, device) -> tuple[int, float, int]:
    """Load a checkpoint (a file or ``runs:/``) with ``weights_only=True``; the next epoch."""
    import torch

    path = uri
    if uri.startswith(("runs:/", "models:/")):
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(uri)
        except Exception as exc:
            raise Seg3dInputError(
                f"resume_from: cannot download {uri} ({str(exc).splitlines()[0][:200]}); give "
                "runs:/<run_id>/checkpoints/last.pt of a run that wrote checkpoints"
            ) from None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise Seg3dInputError(
            f"resume_from: {uri} is not a seg3d checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise Seg3dInputError(f"resume_from: {uri} is not a seg3d checkpoint (no format tag)")
    net = model.module if hasattr(model, "module") else model
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise Seg3dInputError(
            f"resume_from: {uri} was trained with other settings (model "
            f"{state['config'].get('model')}, num_classes {state['config'].get('num_classes')}): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, float(state["best_val_dice"]), int(state["best_epoch"])


def _log_final_model(result: TrainResult, model, config, checkpoints: Path, info) -> None:
    """Log the best weights as the pyfunc; register it with the run's data and preprocessing."""
    import mlflow
    import torch

    from seg3d.pyfunc import log_model

    best = checkpoints / "best.pt"
    net = model.module if hasattr(model, "module") else model
    if best.exists():
        net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
    example = info.pairs[0].image if info.pairs else None
    name = "seg3d" if config.register else None
    info = log_model(net, config, name="model", registered_model_name=name, example_path=example)
    result.model_uri = info.model_uri
    version = getattr(info, "registered_model_version", None)
    if name and version is not None:
        result.registered_version = str(version)
        client = mlflow.MlflowClient()
        tags = mlflow.get_run(result.run_id).data.tags
        for key, value in tags.items():
            if key.startswith(("mlpipe.dataset.", "mlpipe.preprocessing.", "mlpipe.plan.")):
                client.set_model_version_tag(name, str(version), key, value)
        client.set_model_version_tag(
            name, str(version), "seg3d.val_dice", f"{result.best_val_dice:.4f}"
        )


def _flat_params(config: TrainConfig, n_train: int, n_val: int, data_dir: Path) -> dict:
    values = config.to_dict()
    values.pop("extra", None)
    values["auto"] = ",".join(values["auto"]) or "none"
    values["data_dir_resolved"] = str(data_dir)
    values["train_cases"] = n_train
    values["val_cases"] = n_val
    for key in ("patch_size", "spacing", "window"):
        if values[key] is not None:
            values[key] = ",".join(str(v) for v in values[key])
    return {f"seg3d.{k}": v for k, v in values.items()}


def _safe_uri(uri: str) -> str:
    from mlpipe.run.source import strip_credentials

    return strip_credentials(uri) if "://" in uri else uri


def _relaunch_under_torchrun(nproc: int) -> None:
    """Run this same command as ``nproc`` DDP processes; their exit status is ours."""
    # torchrun's own parser would take --nproc for its --nproc-per-node (argparse prefix
    # matching) even after the module name; the workers know their count from WORLD_SIZE.
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        argv.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "seg3d",
        *argv,
    ]
    print(f"seg3d: starting {nproc} processes (torchrun, DDP)", file=sys.stderr, flush=True)
    code = subprocess.call(command)
    if code:
        raise SystemExit(code)
    return None


def _print_summary(result: TrainResult) -> None:
    line = (
        f"seg3d: {result.epochs_done} epochs, best val_dice {result.best_val_dice:.4f} "
        f"(epoch {result.best_epoch + 1})"
    )
    if result.stopped_early:
        line += ", stopped by max_minutes"
    print(line, flush=True)
    if result.model_uri:
        print(f"seg3d: model {result.model_uri}", flush=True)
    if result.registered_version:
        print(f"seg3d: registered seg3d version {result.registered_version}", flush=True)


class _Distributed:
    """torchrun's environment, or a single process: rank, world size, device, reductions."""

    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def start(cls) -> _Distributed:
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as td

            local = int(os.environ.get("LOCAL_RANK", "0"))
            if torch.cuda.is_available():
                torch.cuda.set_device(local)
                device = torch.device("cuda", local)
                td.init_process_group("nccl")
            else:
                device = torch.device("cpu")
                td.init_process_group("gloo")
            return cls(td.get_rank(), world, device)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, device)

    def _reduce(self, value: float, device, op) -> float:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as td

        tensor = torch.tensor([float(value)], device=device)
        td.all_reduce(tensor, op=op)
        return float(tensor.item())

    def mean(self, value: float, device) -> float:
        import torch.distributed as td

        if self.world == 1:
            return value
        return self._reduce(value, device, td.ReduceOp.SUM) / self.world

    def sum(self, value: float, device) -> float:
        if self.world == 1:
            return value
        import torch.distributed as td

        return self._reduce(value, device, td.ReduceOp.SUM)

    def any(self, flag: bool, device) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as td

        return self._reduce(1.0 if flag else 0.0, device, td.ReduceOp.MAX) > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


class _Progress:
    """A progress bar on a terminal; one line per epoch when the output is a pipe or a log."""

    def __init__(self, epochs: int, *, enabled: bool, budget_s: float = 0.0):
        self.epochs, self.enabled = epochs, enabled
        by_time = budget_s > 0 and epochs >= 100_000  # the plan's "until the budget is spent"
        self.total = f"{budget_s / 60:g} min" if by_time else str(epochs)
        self.tty = sys.stderr.isatty()

    def step(self, epoch: int, done: int, total: int) -> None:
        if not (self.enabled and self.tty):
            return
        filled = int(20 * done / max(total, 1))
        bar = "#" * filled + "." * (20 - filled)
        sys.stderr.write(f"\repoch {epoch + 1}/{self.total} [{bar}] {done}/{total}")
        sys.stderr.flush()

    def epoch_done(self, epoch: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        parts = [f"epoch {epoch + 1}/{self.total}", f"train_loss={row['train_loss']:.4f}"]
        if "val_dice" in row:
            parts.append(f"val_dice={row['val_dice']:.4f}")
        parts += [f"{row['epoch_seconds']:.1f}s", f"{row['samples_per_s']:.1f} samples/s"]
        print(" ".join(parts), flush=True)
