"""A run folder, the one place that knows its layout: results.json (a typed record), final/ (the model and mtp.json)
and checkpoints/. The trainer writes it; export, distillation, `encoder.init_from`, the comparison and the search
read it through this module and nothing else.

    output_dir/
        results.json           RunResults: progress, dev scores, parameter counts, the pruning report
        final/model.safetensors every parameter and buffer (masks, gates, factors), pruning not folded
        final/mtp.json          FinalMeta: the config, the tasks with their labels and metric, the final dev scores
        checkpoints/step_N/     DeepSpeed checkpoints (mtp.training.checkpoint)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from mtp.config import ConfigError, ExperimentConfig, saved_config
from mtp.model import PRUNABLE_BY_ARCH, MultitaskModel, load_encoder
from mtp.pruning import PruningSettings, get_method
from mtp.zero3 import full_shape, is_partitioned, load_state_partitioned

RESULTS = "results.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------- the typed records


class PruningReport(BaseModel):
    """What a pruning method reports at the end of a run (results.json's `pruning`; mtp.json's too)."""

    model_config = ConfigDict(extra="allow")

    kept_blocks: int | None = None
    method: str | None = None
    budget: int | None = None
    within_budget: bool | None = None
    dense_blocks: int | None = None
    kept_fraction: float | None = None


class RunResults(BaseModel):
    """results.json: written when the loop ends (finished or stopped); keys a newer mtp adds are kept as they are."""

    model_config = ConfigDict(extra="allow")

    finished: bool = False
    steps: int = 0
    max_steps: int = 0
    params: dict[str, int] = {}
    tasks: dict[str, Any] | None = None
    mean_score: float | None = None
    pruning: PruningReport | None = None

    @property
    def kept_blocks(self) -> int:
        """Encoder-block parameters the final model keeps (the dense count for a dense run)."""
        if self.pruning is not None and self.pruning.kept_blocks is not None:
            return self.pruning.kept_blocks
        return self.params["encoder_blocks"]

    @property
    def within_budget(self) -> bool:
        return bool(self.pruning.within_budget) if self.pruning else True  # a report that does not say: not within

    def task_scores(self) -> dict[str, float]:
        """Each task's headline dev score at the end (empty while unfinished)."""
        return {name: r["score"] for name, r in (self.tasks or {}).items()}


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


def write_results(run_dir: str | Path, results: dict[str, Any]) -> None:
    """results.json, as the trainer's results dict holds it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    results_path(run_dir).write_text(json.dumps(results, indent=2))


def read_results_dict(run_dir: str | Path) -> dict[str, Any] | None:
    """results.json as written (None if there is none or it cannot be read)."""
    try:
        return json.loads(results_path(run_dir).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_results(run_dir: str | Path) -> RunResults | None:
    """results.json as a typed record (None if there is none or it cannot be read)."""
    raw = read_results_dict(run_dir)
    return None if raw is None else RunResults.model_validate(raw)


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run trained to its last step (its results.json says so)."""
    raw = read_results_dict(run_dir)
    return bool(raw and raw.get("finished", False))


def checkpoint_tag_file(run_dir: str | Path) -> Path:
    """checkpoints/latest: the file that names the run's latest checkpoint (DeepSpeed's tag, e.g. "step_500")."""
    return Path(run_dir) / CHECKPOINTS / "latest"


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The tag of the run's latest checkpoint, or None without one (no checkpoints/latest, or an empty one: a write
    cut short, which the trainer refuses to resume from)."""
    try:
        return checkpoint_tag_file(run_dir).read_text().strip() or None
    except OSError:
        return None


def checkpoint_step(tag: str | None) -> int:
    """The optimizer step a checkpoint tag names ("step_500" -> 500); 0 for None or a tag without one."""
    try:
        return int((tag or "").rsplit("_", 1)[-1])
    except ValueError:
        return 0


def final_model_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL / "model.safetensors"


def has_weights(run_dir: str | Path) -> bool:
    """Whether the folder holds a finished model that other runs can start from and distil from."""
    return is_finished(run_dir) and final_model_path(run_dir).is_file()


def has_final_model(run_dir: str | Path) -> bool:
    """Whether final/model.safetensors is there (what export, teachers and init_from read)."""
    return final_model_path(run_dir).is_file()


def write_final_meta(run_dir: str | Path, cfg: ExperimentConfig, steps: int, tasks: list[dict[str, Any]],
                     pruning: dict[str, Any] | None, dev_scores: dict[str, float]) -> None:
    """final/mtp.json: the config, the tasks ({name, labels, metric}), the pruning report and the final scores."""
    meta = {"config": cfg.model_dump(mode="json"), "steps": steps, "tasks": tasks, "pruning": pruning,
            "dev_scores": dev_scores}
    (Path(run_dir) / FINAL / "mtp.json").write_text(json.dumps(meta, indent=2))


def run_tasks(run_dir: str | Path, key: str) -> list[str] | None:
    """The task names of a finished run (from final/mtp.json); None if the folder holds no final model. `key` names
    the config key that asked, in the error for an unreadable mtp.json."""
    meta = Path(run_dir) / FINAL / "mtp.json"
    if not has_final_model(run_dir) or not meta.is_file():
        return None
    try:
        return [t["name"] for t in json.loads(meta.read_text())["tasks"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{key}: {meta} is not an mtp run's final/mtp.json") from None


def require_finished_run(run_dir: str | Path, key: str, tasks: list[str], why: str = "") -> list[str]:
    """The tasks of the finished run `run_dir`, refused in one line (naming `key`) when it is not one or lacks a head
    for one of `tasks`. `why` follows "no final/model.safetensors" in that line."""
    found = run_tasks(run_dir, key)
    if found is None:
        raise ConfigError(f"{key}: {run_dir} holds no finished mtp run (no final/model.safetensors){why}")
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ConfigError(f"{key}: {run_dir} has no head for task {missing[0]!r}")
    return found


# ---------------------------------------------------------------- the final model


def read_final(run_dir: str | Path) -> tuple[ExperimentConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """A finished run's config, mtp.json and saved state (pruning not folded)."""
    run_dir = Path(run_dir)
    if not has_final_model(run_dir):
        raise ConfigError(f"{run_dir}: no final/model.safetensors (has the run finished?)")
    meta = json.loads((run_dir / FINAL / "mtp.json").read_text())
    return saved_config(meta["config"]), meta, load_file(str(final_model_path(run_dir)))


def prunable_paths(state: dict[str, torch.Tensor], model_type: str) -> list[str]:
    """The module paths of the prunable maps in a saved multitask model's state."""
    paths = []
    layer_ids = sorted({int(k.split(".")[3]) for k in state if k.startswith("encoder.encoder.layer.")})
    for idx in layer_ids:
        for sub in PRUNABLE_BY_ARCH[model_type].values():
            paths.append(f"encoder.encoder.layer.{idx}.{sub}")
    return paths


def dense_state(pruning: PruningSettings, state: dict[str, torch.Tensor], model_type: str,
                ) -> dict[str, torch.Tensor]:
    """A saved model's state with every prunable layer folded into one dense weight by its method's layer."""
    layer = get_method(pruning.method).layer
    if layer is None:
        return dict(state)
    paths = prunable_paths(state, model_type)
    own = {f"{path}.{suffix}" for path in paths for suffix in layer.state_suffixes}
    out = {k: v for k, v in state.items() if k not in own}
    for path in paths:
        out[f"{path}.weight"] = layer.fold(state, path, pruning)
    return out


def empty_model(cfg: ExperimentConfig, meta: dict[str, Any]) -> MultitaskModel:
    """The run's architecture with its task heads, random weights (built on CPU: HF encoders hold non-persistent
    buffers, e.g. position ids, that a meta build would leave uninitialised)."""
    encoder = load_encoder(cfg.encoder.name, True, cfg.encoder.config_overrides)
    tasks = {t["name"]: 1 if t["labels"] is None else len(t["labels"]) for t in meta["tasks"]}
    return MultitaskModel(encoder, tasks, cfg.encoder.pooling, cfg.encoder.head_dropout)


def build_dense_model(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> MultitaskModel:
    """The trained multitask model with pruning folded into plain nn.Linear weights."""
    model = empty_model(cfg, meta)
    model.load_state_dict(dense_state(cfg.pruning, state, model.model_type), strict=True)
    return model.eval()


def load_finished_run(run_dir: str | Path, what: str) -> tuple[MultitaskModel, dict[str, Any]]:
    """A finished run's final model (pruning folded into plain weights) and its mtp.json; `what` names the config
    key that asked for it in errors."""
    if not has_final_model(run_dir):
        raise ConfigError(f"{what}: {run_dir} holds no finished mtp run (no final/model.safetensors)")
    cfg, meta, state = read_final(run_dir)
    return build_dense_model(cfg, meta, state), meta


def initialise_from_run(model: MultitaskModel, run_dir: str | Path) -> None:
    """Copy a finished run's encoder and the heads of `model`'s tasks into `model` (encoder.init_from)."""
    source, _ = load_finished_run(run_dir, "encoder.init_from")
    missing = [t for t in model.tasks if t not in source.heads]
    if missing:
        raise ConfigError(f"encoder.init_from: {run_dir} has no head for task {missing[0]!r}")
    state = {k: v for k, v in source.state_dict().items()
             if k.startswith("encoder.") or k.split(".")[1] in model.outputs}
    target = {name: full_shape(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for key, value in state.items():
        if key not in target or target[key] != tuple(value.shape):
            found = target.get(key, "absent")
            raise ConfigError(f"encoder.init_from: {run_dir}: {key} {tuple(value.shape)} does not fit this model "
                              f"({found})")
    if any(is_partitioned(p) for p in model.parameters()):  # ZeRO-3 partitions: one tensor at a time
        load_state_partitioned(model, state)
    else:
        model.load_state_dict(state, strict=True)
