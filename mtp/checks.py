"""Pre-flight checks: everything about an experiment that can be checked before any process starts (files, rows,
labels, DeepSpeed config, output dir, encoder, sources, budget). Each failure is a `ConfigError` (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

from mtp.config import ConfigError, ExperimentConfig


def check_experiment(cfg: ExperimentConfig, world_size: int, resume: bool) -> dict[str, int]:
    """Everything that can be checked before processes start: files, rows, labels, configs, output dir."""
    from mtp.data import MultitaskSampler, load_tasks, task_probabilities
    from mtp.model import load_tokenizer
    from mtp.training import CHECKPOINTS, build_ds_config

    build_ds_config(cfg, world_size)
    ckpts = Path(cfg.output_dir) / CHECKPOINTS
    has_ckpt = (ckpts / "latest").exists()
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoint in {ckpts}")
    if not resume and has_ckpt:
        raise ConfigError(f"output_dir: {cfg.output_dir} already holds checkpoints; pass --resume to continue "
                          "or choose another output_dir")
    _check_encoder(cfg)
    check_sources(cfg)
    tokenizer = load_tokenizer(cfg.encoder)
    tasks = load_tasks(cfg)
    _check_budget(cfg, tasks, tokenizer.pad_token_id)
    sizes = {t.name: len(t.train_texts) for t in tasks}
    MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, world_size, 0)
    return sizes


def _check_encoder(cfg: ExperimentConfig) -> None:
    from transformers import AutoConfig

    from mtp.model import PRUNABLE_BY_ARCH, resolve_encoder_path

    source = resolve_encoder_path(cfg.encoder.name)
    try:
        hf = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"encoder.name: cannot load {source!r}: {str(err).splitlines()[0]}") from None
    if hf.model_type not in PRUNABLE_BY_ARCH:
        raise ConfigError(f"encoder.name: architecture {hf.model_type!r} is not supported")
    for key in cfg.encoder.config_overrides:
        if not hasattr(hf, key):
            raise ConfigError(f"encoder.config_overrides.{key}: not a field of {type(hf).__name__}")


def _run_tasks(run_dir: str, key: str) -> list[str] | None:
    """The task names of a finished mtp run folder (from its final/mtp.json), None if it is not one."""
    meta = Path(run_dir) / "final" / "mtp.json"
    if not (Path(run_dir) / "final" / "model.safetensors").is_file() or not meta.is_file():
        return None
    try:
        return [t["name"] for t in json.loads(meta.read_text())["tasks"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{key}: {meta} is not an mtp run's final/mtp.json") from None


def check_sources(cfg: ExperimentConfig) -> None:
    """encoder.init_from, distill.teacher and distill.task_teachers name something that can give what the config
    asks of it."""
    from mtp.data import canonical_task_name

    tasks = [canonical_task_name(t.name) for t in cfg.tasks]  # as the data and the saved heads name them
    if cfg.encoder.init_from:
        found = _run_tasks(cfg.encoder.init_from, "encoder.init_from")
        if found is None:
            raise ConfigError(f"encoder.init_from: {cfg.encoder.init_from} holds no finished mtp run "
                              "(no final/model.safetensors)")
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ConfigError(f"encoder.init_from: {cfg.encoder.init_from} has no head for task {missing[0]!r}")
    d = cfg.distill
    for task, folder in d.task_teachers.items():
        key = f"distill.task_teachers.{task}"
        heads = _run_tasks(folder, key)
        if heads is None:
            raise ConfigError(f"{key}: {folder} is not a finished mtp run (no final/model.safetensors), so it has "
                              "no task head")
        if task not in heads:
            raise ConfigError(f"{key}: {folder} has no head for task {task!r}")
    if d.teacher is None:
        return
    tasks = [t for t in tasks if t not in d.task_teachers]  # the shared teacher gives logits for the others only
    found = _run_tasks(d.teacher, "distill.teacher")
    if found is None:
        if d.logit_weight > 0 and tasks:
            raise ConfigError(f"distill.teacher: {d.teacher} is not a finished mtp run, so it has no task heads; "
                              "set distill.logit_weight=0 to distil hidden states only")
        from transformers import AutoConfig

        from mtp.model import resolve_encoder_path

        try:
            AutoConfig.from_pretrained(resolve_encoder_path(d.teacher))
        except (OSError, ValueError) as err:
            raise ConfigError(f"distill.teacher: cannot load {d.teacher!r}: {str(err).splitlines()[0]}") from None
    elif d.logit_weight > 0 and any(t not in found for t in tasks):
        missing = next(t for t in tasks if t not in found)
        raise ConfigError(f"distill.teacher: {d.teacher} has no head for task {missing!r} "
                          "(set distill.logit_weight=0 to distil hidden states only)")


def _check_budget(cfg: ExperimentConfig, tasks: list, pad_token_id: int | None) -> None:
    """An infeasible pruning budget is refused here, from the architecture alone (no weights are loaded)."""
    if cfg.pruning.method == "none":
        return
    import torch

    from mtp.model import MultitaskModel, load_encoder, parameter_counts
    from mtp.pruning import make_budget

    meta_cfg = cfg.encoder.model_copy(update={"random_init": True})
    with torch.device("meta"):
        model = MultitaskModel(load_encoder(meta_cfg, pad_token_id), {t.name: t.num_labels for t in tasks})
    make_budget(parameter_counts(model), cfg.pruning.budget)
