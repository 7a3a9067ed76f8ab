"""Training checkpoints: trainable parameters (+ buffers), optimizer, scheduler position, grad scaler, RNG states
and data position, in safetensors + JSON, written atomically (temporary directory, then rename), keeping the
last N. A run directory holds `checkpoints/step-000123/{state.safetensors, meta.json}` and `checkpoints/latest`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_dir, write_text_atomic


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, plus buffers (what LAVIS saves too)."""
    out = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"model.{n}": b.detach() for n, b in model.named_buffers() if b is not None})
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": state["torch"]}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s
    py = state["python"]
    npy = state["numpy"]
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(run_dir: Path, step: int, model, optimizer, scaler, extra: dict, keep_last: int) -> Path:
    """Write checkpoints/step-{step}/ atomically and point checkpoints/latest at it; prune old ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in trainable_state(model).items()}
    opt_t, opt_meta = _optimizer_tensors(optimizer)
    tensors.update({k: v.contiguous().cpu() for k, v in opt_t.items()})
    rng_t, rng_meta = _rng_tensors(_rng_state())
    tensors.update(rng_t)
    meta = {"step": step, "optimizer": opt_meta, "rng": rng_meta, "extra": extra,
            "scaler": scaler.state_dict() if scaler is not None else None}
    name = f"step-{step:07d}"
    final = ckpt_root / name
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))
    write_text_atomic(ckpt_root / "latest", name)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    p = pointer.parent / pointer.read_text().strip()
    return p if (p / "meta.json").is_file() else None


def load_training_state(path: Path, model, optimizer, scaler) -> dict:
    """Restore everything save_training_state wrote; returns {"step", "extra"}."""
    tensors = load_file(str(Path(path) / "state.safetensors"))
    meta = json.loads((Path(path) / "meta.json").read_text())
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("model."):
                name = k[len("model."):]
                if name not in own:
                    raise ValueError(f"{path}: checkpoint tensor {name!r} has no place in this model")
                own[name].copy_(v)
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    _restore_rng(tensors, meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"]}
