"""The experiment config: one YAML file, validated by a pydantic schema, with dotted-key overrides.

Every error a user can make in a config is raised as `ConfigError` with one line that names the key
(or file, or row); the CLI turns it into exit code 2 before any process group starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PlainValidator, SerializeAsAny, field_validator, model_validator

from mtp.glue import canonical_task_name
from mtp.model import DEFAULT_ENCODER
from mtp.pruning import NoPruning, PruningSettings, get_method, parse_settings
from mtp.schema import PROJECT_ROOT, ConfigError, Strict, load_yaml, resolve_path

__all__ = ["PROJECT_ROOT", "ConfigError", "DataConfig", "DistillConfig", "EncoderConfig", "ExperimentConfig",
           "PruningSettings", "SamplingConfig", "TaskConfig", "TrainConfig", "cache_dir", "dump_config", "glue_dir",
           "load_config", "recipe_dump", "resolve_path", "saved_config"]

DEFAULT_LOGGERS = ("tensorboard", "results", "progress")

# the pruning section: the settings of the method it names (mtp.pruning's registry), dumped with all their keys
PruningSection = Annotated[SerializeAsAny[PruningSettings], PlainValidator(parse_settings)]

class EncoderConfig(Strict):
    name: str = DEFAULT_ENCODER
    """Hugging Face name or local folder. With random_init, a folder (or name) holding config.json."""
    tokenizer: str | None = None
    """Tokenizer name or folder; defaults to `name`."""
    random_init: bool = False
    """Build the architecture from its config with random weights (tests, large-architecture checks)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Keys set on the transformers config before the model is built (e.g. num_hidden_layers)."""
    pooling: Literal["cls", "mean"] = "cls"
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    init_from: str | None = None
    """A finished mtp run folder: training starts from its final encoder and task heads (pruning folded in),
    e.g. a dense fine-tuned run that pruning then starts from. Every task must have a head there."""

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's hub name or folder: `tokenizer`, else the encoder's."""
        return self.tokenizer or self.name


class TaskConfig(Strict):
    name: str
    """A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or any name for a custom task."""
    train_file: str | None = None
    dev_file: str | None = None
    format: Literal["csv", "tsv", "jsonl"] | None = None
    """Custom tasks: file format; inferred from the extension when left out."""
    text_columns: list[str] | None = None
    label_column: str | None = None
    labels: list[str] | None = None
    """Custom classification tasks: the label names, in index order."""
    regression: bool = False
    metric: Literal["accuracy", "f1_accuracy", "matthews", "pearson_spearman"] | None = None
    max_train_examples: int | None = Field(None, gt=0)
    """Subsample the training set (seeded) to at most this many rows."""
    max_dev_examples: int | None = Field(None, gt=0)
    weight: float = Field(1.0, gt=0.0)
    """Loss weight w_t."""

    @property
    def is_custom(self) -> bool:
        return self.train_file is not None


class DataConfig(Strict):
    glue_dir: str | None = None
    """Folder with the canonical GLUE files; else $MTP_GLUE_DIR; else the hub (nyu-mll/glue)."""
    max_seq_len: int = Field(128, ge=8, le=4096)
    cache_dir: str | None = None
    """Tokenized datasets cache; defaults to $MTP_CACHE_DIR or ~/.cache/mtp."""


class SamplingConfig(Strict):
    strategy: Literal["proportional", "temperature", "uniform", "given"] = "temperature"
    temperature: float = Field(2.0, gt=0.0)
    probabilities: dict[str, float] | None = None


class TrainConfig(Strict):
    deepspeed_config: str = "ds_configs/cpu_zero2.json"
    micro_batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps. When unset, `epochs` over the summed training sets decides."""
    epochs: float = Field(1.0, gt=0.0)
    seed: int = 42
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, gt=0)
    stop_after_steps: int | None = Field(None, gt=0)
    """Checkpoint and stop after this many steps, as an interrupted run would (the schedule is unchanged)."""
    eval_batch_size: int = Field(64, gt=0)
    compile: bool = False
    """torch.compile the encoder (in place, dynamic shapes); off until measured to pay (docs/gpu.md)."""
    length_buckets: int = Field(0, ge=0)
    """Batch rows of like length: each task's epoch is sorted by length within windows of this many global batches,
    whose batches are then shuffled (fewer pad tokens per micro-batch; bench/pad_share.py). 0: plain shuffling."""
    loggers: list[str] = Field(default_factory=lambda: list(DEFAULT_LOGGERS))
    """The loggers on rank 0, by their registered names (mtp.training.loggers): TensorBoard, results.json (which
    the comparison and the search read) and the progress bar."""


class DistillConfig(Strict):
    """Knowledge distillation from a dense teacher, an option of every method (and of dense training)."""

    teacher: str | None = None
    """A finished mtp run folder (encoder and heads: logit and hidden-state distillation) or a Hugging Face encoder
    (name or folder: hidden states only). None: no distillation (unless task_teachers)."""
    task_teachers: dict[str, str] = Field(default_factory=dict)
    """Per-task logit teachers of a multitask model (MT-DNN's distillation; METHOD.md 7: each task's dense model):
    task -> a finished mtp run with a head for it, e.g. that task's own dense run. Its logits are the targets of
    that task's batches; block outputs (hidden_weight) still come from `teacher`; tasks not named take their
    logits from `teacher`."""
    task_weight: float = Field(1.0, ge=0.0)
    """Weight of the task loss (the labels)."""
    logit_weight: float = Field(1.0, ge=0.0)
    """Weight of the logit loss: KL(teacher || student) at `temperature`, times T^2; squared error for regression."""
    temperature: float = Field(2.0, gt=0.0)
    hidden_weight: float = Field(0.0, ge=0.0)
    """Weight of the hidden-state loss: mean squared error between every block's output of student and teacher
    (layer i to layer i, over real tokens), averaged over the blocks, as CoFi's layer distillation."""

    @field_validator("task_teachers")
    @classmethod
    def _canonical_tasks(cls, value: dict[str, str]) -> dict[str, str]:
        """Task names as the data reads them (SST-2 -> sst2), sorted: the same recipe has one fingerprint."""
        return {canonical_task_name(k): value[k] for k in sorted(value, key=canonical_task_name)}

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.teacher is not None and self.task_weight + self.logit_weight + self.hidden_weight == 0:
            raise ValueError("distill: task_weight, logit_weight and hidden_weight are all 0")
        if self.task_teachers and self.logit_weight == 0:
            raise ValueError("distill.task_teachers: they give logits only, and distill.logit_weight is 0")
        if self.task_teachers and self.teacher is None and self.hidden_weight > 0:
            raise ValueError("distill.hidden_weight: block outputs come from distill.teacher, which is not set "
                             "(task_teachers give logits only)")
        return self

    @property
    def enabled(self) -> bool:
        return self.teacher is not None or bool(self.task_teachers)


class ExperimentConfig(Strict):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: list[TaskConfig]
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pruning: PruningSection = Field(default_factory=NoPruning)
    """The pruning method and its keys (mtp.pruning's registry: each method reads its own)."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output_dir: str = "runs/default"

    @model_validator(mode="after")
    def _check_tasks(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks: at least one task is needed")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: task {dupes[0]!r} is listed twice")
        if self.sampling.strategy == "given":
            probs = self.sampling.probabilities or {}
            missing = [n for n in names if n not in probs]
            extra = [n for n in probs if n not in names]
            if missing or extra:
                culprit = missing[0] if missing else extra[0]
                raise ValueError(f"sampling.probabilities: {culprit!r} must match the task list {names}")
            if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
                raise ValueError("sampling.probabilities: must be non-negative with a positive sum")
        canonical = [canonical_task_name(n) for n in names]
        stray = [t for t in self.distill.task_teachers if t not in canonical]
        if stray:
            raise ValueError(f"distill.task_teachers: {stray[0]!r} is not one of the tasks {canonical}")
        if self.distill.task_teachers and self.distill.teacher is None:
            orphan = [n for n in canonical if n not in self.distill.task_teachers]
            if orphan:
                raise ValueError(f"distill.task_teachers: task {orphan[0]!r} has no teacher (name it, or set "
                                 "distill.teacher for the tasks not named)")
        return self


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply `dotted.key=value` overrides, validate it against the schema."""
    return load_yaml(path, ExperimentConfig, overrides)


def saved_config(tree: dict[str, Any]) -> ExperimentConfig:
    """The config a finished run saved (final/mtp.json). Runs saved before each method had its own keys hold every
    method's keys in `pruning:`; those the run's method does not read are dropped. A key added since the run was
    saved (NEUTRAL_WHEN_UNSET) takes its neutral value, the behaviour the run trained with, not today's default
    (structured runs saved before `attention_share` competed freely, whatever the default is now)."""
    pruning = dict(tree.get("pruning") or {})
    fields = get_method(pruning.get("method", "none")).settings.model_fields
    tree = {**tree, "pruning": {k: v for k, v in pruning.items() if k in fields}}
    for keys, neutral in NEUTRAL_WHEN_UNSET.items():
        if len(keys) != 2 or not isinstance(tree.get(keys[0]), dict) or keys[1] in tree[keys[0]]:
            continue
        if keys[0] == "pruning" and keys[1] not in fields:  # another method's key
            continue
        tree[keys[0]] = {**tree[keys[0]], keys[1]: copy.deepcopy(neutral)}
    return ExperimentConfig.model_validate(tree)


def glue_dir(cfg: ExperimentConfig) -> Path | None:
    """The local GLUE folder (config, then $MTP_GLUE_DIR), or None to read from the hub."""
    raw = cfg.data.glue_dir or os.environ.get("MTP_GLUE_DIR")
    if not raw:
        return None
    folder = Path(raw).expanduser()
    if not folder.is_dir():
        key = "data.glue_dir" if cfg.data.glue_dir else "$MTP_GLUE_DIR"
        raise ConfigError(f"{key}: not a folder: {raw}")
    return folder.resolve()


def cache_dir(cfg: ExperimentConfig) -> Path:
    raw = cfg.data.cache_dir or os.environ.get("MTP_CACHE_DIR") or "~/.cache/mtp"
    return Path(raw).expanduser()


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys added after recipes were first fingerprinted; at these values they change nothing, so a recipe that leaves
# them there keeps the fingerprint it had before they existed (finished runs stay current).
NEUTRAL_WHEN_UNSET: dict[tuple[str, ...], Any] = {
    ("encoder", "init_from"): None,
    ("train", "loggers"): list(DEFAULT_LOGGERS),
    ("train", "length_buckets"): 0,
    ("train", "compile"): False,
    ("pruning", "size_control"): "lagrangian",
    ("pruning", "lag_limit"): None,
    ("pruning", "lag_response"): "shift",
    ("pruning", "close_order"): "log_alpha",
    ("pruning", "close_from"): None,
    ("pruning", "finetune_ratio"): 0.0,
    ("pruning", "attention_share"): None,
    ("distill", "task_teachers"): {},  # before the section: keys added later go first
    ("distill",): DistillConfig().model_dump(mode="json", exclude={"task_teachers"}),
}


# Fingerprints were first made when one flat `pruning:` section held every method's keys. A recipe is still hashed
# that way, so that finished runs stay current: the section lists these keys in this order, and a key the run's method
# does not read takes the value given here (the defaults then; soft movement's two keys at their values before
# their defaults changed).
FINGERPRINT_PRUNING_KEYS: dict[str, Any] = {
    "method": None, "budget": None, "scope": "per_matrix", "warmup_ratio": None, "cooldown_ratio": None,
    "score_lr": 1e-2, "soft_threshold": 0.5, "soft_lambda": 1.0, "gate_lr": 5e-2, "lagrangian_lr": 0.1,
    "lambda2_init": 100.0, "finetune_ratio": None, "log_alpha_init": 2.5, "gate_beta": 2.0 / 3.0, "gate_low": -0.1,
    "gate_high": 1.1,
}


def recipe_dump(cfg: ExperimentConfig) -> str:
    """The config as YAML for fingerprints: `dump_config` with the pruning section in its first, flat form
    (FINGERPRINT_PRUNING_KEYS), less the keys of NEUTRAL_WHEN_UNSET at their neutral value."""
    tree = cfg.model_dump(mode="json")
    own = tree["pruning"]  # keys of methods added since then follow, as they are
    tree["pruning"] = {key: own.get(key, fixed) for key, fixed in FINGERPRINT_PRUNING_KEYS.items()} | {
        key: value for key, value in own.items() if key not in FINGERPRINT_PRUNING_KEYS}
    for keys, neutral in NEUTRAL_WHEN_UNSET.items():
        node = tree
        for key in keys[:-1]:
            node = node[key]
        if keys[-1] in node and node[keys[-1]] == neutral:  # a method's own key is absent from the others'
            del node[keys[-1]]
    version = cfg.pruning.recipe_version()
    if version != 1:  # a method whose code changed what it trains: its earlier runs are stale
        tree["pruning"]["method_version"] = version
    return yaml.safe_dump(tree, sort_keys=False)
