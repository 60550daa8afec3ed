"""The experiment config: one YAML file, validated by a pydantic schema, with dotted-key overrides.

Every error a user can make in a config is raised as `ConfigError` with one line that names the key
(or file, or row); the CLI turns it into exit code 2 before any process group starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A user error in the config or its inputs; the message is one line naming the culprit."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Strict):
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


class TaskConfig(_Strict):
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


class DataConfig(_Strict):
    glue_dir: str | None = None
    """Folder with the canonical GLUE files; else $MTP_GLUE_DIR; else the hub (nyu-mll/glue)."""
    max_seq_len: int = Field(128, ge=8, le=4096)
    cache_dir: str | None = None
    """Tokenized datasets cache; defaults to $MTP_CACHE_DIR or ~/.cache/mtp."""


class SamplingConfig(_Strict):
    strategy: Literal["proportional", "temperature", "uniform", "given"] = "temperature"
    temperature: float = Field(2.0, gt=0.0)
    probabilities: dict[str, float] | None = None


class TrainConfig(_Strict):
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


class PruningConfig(_Strict):
    method: Literal["none", "magnitude", "movement", "soft_movement", "rank"] = "none"
    budget: float = Field(1.0, gt=0.0)
    """Encoder budget B: a fraction of the dense encoder-block parameters (<= 1) or a parameter count (> 1)."""
    scope: Literal["per_matrix", "global"] = "per_matrix"
    """Element-wise top-k per matrix or over all prunable matrices at once."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Dense warmup w0, as a fraction of the optimizer steps."""
    cooldown_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Cool-down w1 at the final density (or Lagrangian target), as a fraction of the steps."""
    score_lr: float = Field(1e-2, gt=0.0)
    """Learning rate of movement scores."""
    soft_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    """Soft movement: final tau in M = 1[sigmoid(S) > tau] (ramped from 0 by the cubic schedule; Sanh et al.: 0.1)."""
    soft_lambda: float = Field(400.0, ge=0.0)
    """Soft movement: final weight of mean(sigmoid(S)) in the loss (ramped with tau; Sanh et al.: 400)."""
    gate_lr: float = Field(5e-2, gt=0.0)
    """Rank pruning: learning rate of the gates' log alpha, constant (it follows neither warmup nor decay)."""
    lagrangian_lr: float = Field(0.1, gt=0.0)
    """Rank pruning: step size of the gradient ascent on lambda1 and lambda2."""
    lambda2_init: float = Field(100.0, ge=0.0)
    """Rank pruning: initial lambda2, the weight of the quadratic penalty (s - t)^2 that keeps the expected size on
    the target (with 0, lambda1 alone lags, winds up and overshoots; docs/pruning.md)."""
    finetune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """The last fraction of the steps trains the weights at fixed masks or ranks (fixed when it starts: the final
    top-k, soft movement's projection, rank's projection to the budget); the schedule ends before it."""
    log_alpha_init: float = 2.5
    """Rank pruning: initial log alpha; 2.5 makes every deterministic gate 1 (the pretrained map). Gates are not
    sampled before the pruning warmup ends (a sampled gate falls below 1 on 29% of the ranks at 2.5)."""
    gate_beta: float = Field(2.0 / 3.0, gt=0.0)
    gate_low: float = Field(-0.1, lt=0.0)
    gate_high: float = Field(1.1, gt=1.0)

    @model_validator(mode="after")
    def _check(self) -> PruningConfig:
        if self.warmup_ratio + self.cooldown_ratio + self.finetune_ratio >= 1.0:
            raise ValueError("pruning.warmup_ratio + pruning.cooldown_ratio + pruning.finetune_ratio must be below 1")
        if self.budget > 1.0 and self.budget != int(self.budget):
            raise ValueError(f"pruning.budget: {self.budget} is neither a fraction (<= 1) nor a parameter count")
        if self.method != "none" and self.budget == 1.0:
            raise ValueError(f"pruning.budget: method {self.method!r} needs a budget below the dense size")
        return self


class DistillConfig(_Strict):
    """Knowledge distillation from a dense teacher, an option of every method (and of dense training)."""

    teacher: str | None = None
    """A finished mtp run folder (encoder and heads: logit and hidden-state distillation) or a Hugging Face encoder
    (name or folder: hidden states only). None: no distillation."""
    task_weight: float = Field(1.0, ge=0.0)
    """Weight of the task loss (the labels)."""
    logit_weight: float = Field(1.0, ge=0.0)
    """Weight of the logit loss: KL(teacher || student) at `temperature`, times T^2; squared error for regression."""
    temperature: float = Field(2.0, gt=0.0)
    hidden_weight: float = Field(0.0, ge=0.0)
    """Weight of the hidden-state loss: mean squared error between every block's output of student and teacher
    (layer i to layer i, over real tokens), averaged over the blocks, as CoFi's layer distillation."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.teacher is not None and self.task_weight + self.logit_weight + self.hidden_weight == 0:
            raise ValueError("distill: task_weight, logit_weight and hidden_weight are all 0")
        return self


class ExperimentConfig(_Strict):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: list[TaskConfig]
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
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
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c=value` in a nested dict; list items are addressed by index or by task name."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, key, dotted)
            if last:
                node[idx] = value
                return
            node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = value
            return
        node = node.setdefault(key, {})


def _list_index(items: list[Any], key: str, dotted: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return idx
    raise ConfigError(f"override {dotted}: no list item {key!r}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn `key.sub=value` strings into (key, YAML-typed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    # tasks.2.name -> tasks[2].name reads better
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    detail = f" (got {got!r})" if first["type"] not in ("extra_forbidden", "missing") and got is not None else ""
    where = f"{loc}: " if loc else ""
    return f"{source}: {where}{msg}{detail}"


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply `dotted.key=value` overrides, validate it against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None


def resolve_path(path: str, what: str) -> Path:
    """Find a file named in the config: as given, else relative to the project root."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if not candidate.is_absolute() and (PROJECT_ROOT / candidate).exists():
        return (PROJECT_ROOT / candidate).resolve()
    raise ConfigError(f"{what}: file not found: {path}")


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
    ("pruning", "finetune_ratio"): 0.0,
    ("distill",): DistillConfig().model_dump(mode="json"),
}


# Method keys whose default changed: a run whose method does not read one is hashed with the value the key had when
# fingerprints were first made, so that the change leaves the other methods' (and dense) recipes as they were.
UNREAD_KEYS_HASHED_AS: dict[str, tuple[set[str], Any]] = {
    "soft_threshold": ({"soft_movement"}, 0.5),
    "soft_lambda": ({"soft_movement"}, 1.0),
}


def recipe_dump(cfg: ExperimentConfig) -> str:
    """The config as YAML for fingerprints: `dump_config` less the keys of NEUTRAL_WHEN_UNSET at their neutral value,
    and with the method keys the run does not read at fixed values (UNREAD_KEYS_HASHED_AS)."""
    tree = cfg.model_dump(mode="json")
    for keys, neutral in NEUTRAL_WHEN_UNSET.items():
        node = tree
        for key in keys[:-1]:
            node = node[key]
        if node.get(keys[-1]) == neutral:
            del node[keys[-1]]
    for key, (readers, hashed_as) in UNREAD_KEYS_HASHED_AS.items():
        if cfg.pruning.method not in readers:
            tree["pruning"][key] = hashed_as
    return yaml.safe_dump(tree, sort_keys=False)
