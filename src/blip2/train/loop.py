"""`blip2 train`: the training loop, visible in one function (`train`).

Stage 0 (the image encoder), stage 1 (ITC + ITM + ITG), stage 2 (LM loss through the frozen LLM) and
instruction tuning share it: each stage is a small objective returning named losses (`objectives.py`), which the
loop asks what FSDP may shard and what to export; the weights' dtypes under autocast follow the precision policy
(`runtime.place_for_training`). One plain process, or `torchrun` with DDP (gloo on CPU, NCCL on GPU). Per-step
warmup + cosine, gradient accumulation, clipping, bf16/fp16 autocast on GPU with fp32 master weights, atomic
checkpoints with exact resume, NaN/inf steps skipped and counted.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .build import build_model
from .config import RunConfig, save_run_config
from .fsdp import ddp_ignore, full_state_dict, shard_frozen_llm
from .objectives import Objective, objective_for
from .optim import build_optimizer, lr_at
from .pipeline import build_train_data
from .runtime import amp_settings, place_for_training, seed_everything, setup_distributed
from .state import latest_checkpoint, load_training_state, save_training_state
from .validate import validate


class TrainingAborted(RuntimeError):
    pass


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: RunConfig) -> dict:
    rank, world, device = setup_distributed(cfg)
    out_dir = Path(cfg.output_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, out_dir / "config.yaml")
    amp_dtype, use_scaler = amp_settings(cfg, device)
    objective = _objective_on_device(cfg, out_dir, rank, device, amp_dtype)
    model = objective.model
    runner, ignored = _runner(objective, cfg, world, device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    data = build_train_data(cfg, model, rank, world)
    counters = {"skipped_samples": 0, "bad_steps": 0, "samples": 0}
    metrics_path = out_dir / "metrics.jsonl"
    start = _resume(cfg, out_dir, metrics_path, model, optimizer, scaler, data, counters, is_main)

    writer = _tensorboard(out_dir) if is_main and cfg.tensorboard else None
    bar = _progress(cfg, start) if is_main else None
    o, bad_in_a_row, t_start = cfg.optim, 0, time.perf_counter()
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, o.lr, o.min_lr, o.warmup_steps, o.warmup_lr, cfg.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        t0 = time.perf_counter()
        sums = _accumulate(cfg, runner, data, step, device, world, amp_dtype, scaler, counters)
        if sums is None:  # a NaN/inf loss on some rank: every rank skips the step
            optimizer.zero_grad(set_to_none=True)
            counters["bad_steps"] += 1
            bad_in_a_row += 1
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingAborted(f"{bad_in_a_row} steps in a row had a NaN/inf loss (last at step {step + 1}); "
                                      f"lower optim.lr or check the data")
            continue
        bad_in_a_row = 0
        _optimizer_step(model, optimizer, scaler, o.clip_grad)
        sums = _global_mean(sums, world, device)
        if is_main:
            row = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                   "step_time": round(time.perf_counter() - t0, 4)}
            _log(row, sums["loss"], metrics_path, writer, bar)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            _save(cfg, out_dir, step + 1, model, optimizer, scaler, data, counters, is_main)
        if cfg.val_every and (step + 1) % cfg.val_every == 0:
            _validate(cfg, model, step + 1, out_dir, writer, is_main)
    if bar is not None:
        bar.close()

    _save(cfg, out_dir, cfg.max_steps, model, optimizer, scaler, data, counters, is_main)
    full_state = full_state_dict(model) if ignored else None  # export needs the whole LLM weights
    summary = {"steps": cfg.max_steps, **counters, "wall_time_s": round(time.perf_counter() - t_start, 2),
               "world_size": world}
    if is_main:
        _export(cfg, objective, out_dir, full_state, summary)
        if cfg.plots:
            _plot(metrics_path, out_dir / "loss.png")
        if writer is not None:
            writer.close()
        if counters["skipped_samples"]:
            print(f"skipped {counters['skipped_samples']} bad samples (see summary.json)")
    if world > 1:
        dist.barrier()
    return summary


def _objective_on_device(cfg: RunConfig, out_dir: Path, rank: int, device: torch.device, amp_dtype) -> Objective:
    """The stage's objective around the run's model, in training mode on `device`; frozen towers in reduced
    precision, trainable weights fp32."""
    seed_everything(cfg.seed)  # the same random init on every rank (FSDP shards are not broadcast)
    model = build_model(cfg, out_dir / ("work" if rank == 0 else f"work-rank{rank}"))
    seed_everything(cfg.seed + rank)  # per-rank seeding: dropout differs across ranks, as it should
    objective = objective_for(cfg.stage)(model)
    place_for_training(model, amp_dtype)  # frozen towers in amp_dtype (ViT LayerNorms fp32); trainable fp32
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    return objective


def _runner(objective: Objective, cfg: RunConfig, world: int, device: torch.device):
    """(what a step calls: the objective, DDP-wrapped in several processes; the names FSDP shards)."""
    ignored: list[str] = []
    if cfg.fsdp and world > 1 and objective.frozen_llm() is not None:
        ignored = shard_frozen_llm(objective.model, device)
    if world == 1:
        return objective, ignored
    if ignored:  # DDP replicates the trainable parts; the sharded frozen LLM is FSDP's
        ddp_ignore(objective, ignored)
    ddp = torch.nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    return ddp, ignored


def _resume(cfg: RunConfig, out_dir: Path, metrics_path: Path, model, optimizer, scaler, data, counters: dict,
            is_main: bool) -> int:
    """The step to start from: the latest checkpoint's (restoring model, optimiser, data and counters) with
    cfg.resume, else 0 (a fresh run's metrics file starts empty)."""
    if not cfg.resume:
        if is_main and metrics_path.exists():
            metrics_path.unlink()
        return 0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return 0
    st = load_training_state(ckpt, model, optimizer, scaler)
    counters.update(st["extra"]["counters"])
    data.load_state_dict(st["extra"]["data"])
    if is_main:
        _truncate_metrics(metrics_path, st["step"])
        print(f"resumed from {ckpt} (step {st['step']})")
    return st["step"]


def _accumulate(cfg: RunConfig, runner, data, step: int, device: torch.device, world: int, amp_dtype, scaler,
                counters: dict) -> dict | None:
    """Forward and backward over optim.grad_accum micro-batches: the step's mean losses by name, or None when a
    loss is not finite on any rank (the gradients are then partial and must be dropped)."""
    o = cfg.optim
    sums: dict[str, float] = {}
    for micro in range(o.grad_accum):
        batch = data.next_batch()
        counters["skipped_samples"] += int(batch.pop("skipped", 0))
        counters["samples"] += int(batch["pixel_values"].shape[0]) * world
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + micro)  # same on every rank
        sync = world == 1 or micro == o.grad_accum - 1
        with (nullcontext() if sync else runner.no_sync()):
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                out = runner(batch, gen)
            loss = out["loss"]
            ok = torch.tensor(float(torch.isfinite(loss).all()), device=device)
            if world > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips together
            if ok.item() < 1:
                return None
            scaled = loss / o.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / o.grad_accum
    return sums


def _optimizer_step(model, optimizer, scaler, clip_grad: float | None) -> None:
    """Unscale, clip the trainable gradients' norm, step, zero the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _global_mean(sums: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The losses averaged over the processes (what is logged)."""
    if world == 1:
        return sums
    vals = torch.tensor(list(sums.values()), device=device)
    dist.all_reduce(vals)
    return dict(zip(sums, (vals / world).tolist()))


def _log(row: dict, loss: float, metrics_path: Path, writer, bar) -> None:
    """One step's row to metrics.jsonl, TensorBoard and the progress bar."""
    with metrics_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(f"train/{k}", v, row["step"])
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")


def _export(cfg: RunConfig, objective: Objective, out_dir: Path, full_state, summary: dict) -> None:
    """What the stage keeps (its objective says: the whole model, or stage 0's image encoder) and summary.json."""
    objective.model.eval()
    objective.export(cfg, out_dir, full_state)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _save(cfg, out_dir, step, model, optimizer, scaler, data, counters, is_main) -> None:
    if is_main:
        save_training_state(out_dir, step, model, optimizer, scaler,
                            {"counters": counters, "data": data.state_dict()}, cfg.keep_last)
    if dist.is_initialized():
        dist.barrier()


def _validate(cfg, model, step, out_dir, writer, is_main) -> None:
    model.eval()
    try:
        result = validate(cfg, model)
    finally:
        model.train()
    if is_main and result:
        with (out_dir / "val.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        if writer is not None:
            for k, v in result.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"val/{k}", v, step)


def _tensorboard(out_dir: Path):
    try:  # deferred: tensorboard is an optional extra (train)
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _progress(cfg: RunConfig, start: int):
    return tqdm(total=cfg.max_steps, initial=start, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)


def _plot(metrics_path: Path, png: Path) -> None:
    """Loss curves of every named loss against the step."""
    try:  # deferred: matplotlib is an optional extra (train)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    keys = [k for k in rows[0] if k.endswith("loss")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        xs = [r["step"] for r in rows if k in r and math.isfinite(r[k])]
        ax.plot(xs, [r[k] for r in rows if k in r and math.isfinite(r[k])], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
