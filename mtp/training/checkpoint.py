"""Checkpoints: DeepSpeed's engine state, the run's progress and the hooks' state in its client state, and every
rank's RNG state beside it; the oldest are removed. A SIGTERM during a save waits for the save to complete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtp.config import ConfigError
from mtp.hooks import Hook
from mtp.training.distributed import terminate_after
from mtp.training.state import TrainState


def save_checkpoint(engine: Any, folder: Path, state: TrainState, sampler: Any, hooks: list[Hook], rank: int,
                    keep: int) -> None:
    """Save `step_N` (engine, progress, sampler, hooks, RNG) and keep the newest `keep` checkpoints."""
    with terminate_after():
        tag = f"step_{state.step}"
        client = {"mtp": {**state.checkpoint(), "sampler": sampler.state_dict(),
                          "hooks": {h.name: h.state_dict() for h in hooks}}}
        engine.save_checkpoint(str(folder), tag=tag, client_state=client)
        save_rng(folder / tag / f"rng_rank{rank}.safetensors")
        dist.barrier()
        if rank == 0:
            tags = sorted((p for p in folder.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()


def load_checkpoint(engine: Any, folder: Path, sampler: Any, hooks: list[Hook], rank: int) -> TrainState:
    """Restore the latest checkpoint into the engine, the sampler, the hooks and the RNG; returns the progress."""
    problem = layout_problem(folder, set(engine.module.state_dict()))
    if problem is not None:
        raise ConfigError(f"--resume: {folder}: {problem}")
    path, client = engine.load_checkpoint(str(folder))
    if path is None:
        raise ConfigError(f"--resume: no checkpoint in {folder}")
    saved = client["mtp"]
    sampler.load_state_dict(saved["sampler"])
    for hook in hooks:
        hook.load_state_dict(saved["hooks"].get(hook.name, {}))
    rng_file = Path(path).parent / f"rng_rank{rank}.safetensors"
    if not rng_file.exists():  # DeepSpeed returns the model-states file path
        rng_file = Path(path) / f"rng_rank{rank}.safetensors"
    load_rng(rng_file)
    return TrainState.from_checkpoint(saved)


# parameters whose training-time storage changed: (a key of the old layout, its new key, what changed)
STORAGE_CHANGES = ((".P", ".factors", "rank kept P and Q in one parameter (mtp f7a1593)"),
                   (".scores", ".mtp_scores", "movement kept one score parameter per encoder block"))


def layout_problem(folder: Path, expected: set[str]) -> str | None:
    """Why the latest checkpoint in `folder` cannot be loaded into a model whose state keys are `expected`, read from
    the keys it saved (memory-mapped, before DeepSpeed loads anything), or None: a checkpoint of another model or
    method, or one written before a method changed how it stores its parameters."""
    latest = folder / "latest"
    if not latest.is_file():
        return None
    states = sorted((folder / latest.read_text().strip()).glob("*model_states.pt"))
    if not states:
        return None
    try:
        saved = set(torch.load(states[0], map_location="cpu", mmap=True, weights_only=False).get("module") or {})
    except Exception:  # not a zipfile checkpoint (another checkpoint engine, an old format): DeepSpeed's load decides
        return None
    if not saved or saved == expected:  # (no module state saved: DeepSpeed's own load decides)
        return None
    extra, missing = sorted(saved - expected), sorted(expected - saved)
    for old, new, change in STORAGE_CHANGES:
        if any(k.endswith(old) for k in extra) and any(k.endswith(new) for k in missing):
            return (f"the checkpoint is from before {change}; resume it with the mtp that wrote it, or start the "
                    f"run over")
    first = f"it holds {extra[0]}, which this model lacks" if extra else f"it lacks {missing[0]}"
    return f"the checkpoint was written by another model, method or mtp version ({first}); start the run over, or " \
           f"resume it with the config and the mtp that wrote it"


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path))


def load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        return
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
