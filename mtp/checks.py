"""Pre-flight checks: everything about an experiment that can be checked before any process starts (files, rows,
labels, DeepSpeed config, output dir, encoder, sources, budget, loggers). Each failure is a `ConfigError` (exit code
2). The checks themselves live with what they check (the schema, the data, the model, the run folder, distillation,
the pruning budget); this module runs them all."""

from __future__ import annotations

from pathlib import Path

import torch

from mtp.config import ConfigError, ExperimentConfig
from mtp.data import MultitaskSampler, load_tasks, task_probabilities
from mtp.distill import check_teachers
from mtp.glue import canonical_task_name
from mtp.model import MultitaskModel, load_encoder, load_hf_config, load_tokenizer, parameter_counts
from mtp.pruning import make_budget
from mtp.run_folder import CHECKPOINTS, checkpoint_tag_file, latest_checkpoint, require_finished_run
from mtp.training.loggers import check_loggers
from mtp.training.optim import build_ds_config


def check_experiment(cfg: ExperimentConfig, world_size: int, resume: bool) -> dict[str, int]:
    """Everything that can be checked before processes start: files, rows, labels, configs, output dir."""
    build_ds_config(cfg, world_size)
    check_loggers(cfg.train.loggers)
    ckpts = Path(cfg.output_dir) / CHECKPOINTS
    has_ckpt = checkpoint_tag_file(cfg.output_dir).exists()
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoint in {ckpts}")
    if resume and latest_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"--resume: {checkpoint_tag_file(cfg.output_dir)} is empty (a checkpoint's write was cut "
                          "short): write the name of its last complete checkpoint folder into it, e.g. step_500")
    if not resume and has_ckpt:
        raise ConfigError(f"output_dir: {cfg.output_dir} already holds checkpoints; pass --resume to continue "
                          "or choose another output_dir")
    load_hf_config(cfg.encoder.name, cfg.encoder.config_overrides)
    check_sources(cfg)
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    tasks = load_tasks(cfg)
    _check_budget(cfg, tasks, tokenizer.pad_token_id)
    sizes = {t.name: len(t.train_texts) for t in tasks}
    MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, world_size, 0)
    return sizes


def check_sources(cfg: ExperimentConfig) -> None:
    """encoder.init_from, distill.teacher and distill.task_teachers name something that can give what the config
    asks of it."""
    tasks = [canonical_task_name(t.name) for t in cfg.tasks]  # as the data and the saved heads name them
    if cfg.encoder.init_from:
        require_finished_run(cfg.encoder.init_from, "encoder.init_from", tasks)
    check_teachers(cfg.distill, tasks)


def _check_budget(cfg: ExperimentConfig, tasks: list, pad_token_id: int | None) -> None:
    """An infeasible pruning budget is refused here, from the architecture alone (no weights are loaded)."""
    if cfg.pruning.method == "none":
        return
    with torch.device("meta"):
        encoder = load_encoder(cfg.encoder.name, True, cfg.encoder.config_overrides, pad_token_id)
        model = MultitaskModel(encoder, {t.name: t.num_labels for t in tasks})
    make_budget(parameter_counts(model), cfg.pruning.budget)
