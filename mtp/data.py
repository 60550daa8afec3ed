"""Tasks and their data: GLUE (local files or the hub) and custom CSV/TSV/JSONL tasks.

Reading and checking happen in the launcher process (so a bad row fails before DeepSpeed starts);
tokenization goes through `datasets` with an on-disk cache; `MultitaskSampler` draws the task of
every micro-step (the same on every rank) and each rank's share of that task's batch.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtp.config import ConfigError, ExperimentConfig, TaskConfig, cache_dir, glue_dir, resolve_path
from mtp.glue import GLUE, GlueSpec, canonical_task_name

csv.field_size_limit(1 << 24)




@dataclass
class TaskData:
    """One task's examples: texts as tuples (one or two strings), labels as int or float."""

    name: str
    labels: tuple[str, ...] | None  # None: regression
    metric: str
    weight: float
    train_texts: list[tuple[str, ...]]
    train_labels: list[float]
    dev: dict[str, tuple[list[tuple[str, ...]], list[float]]]
    fingerprint: str = ""
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


# ---------------------------------------------------------------- reading rows


def _read_table(path: Path, fmt: str, header: bool = True,
                column_names: tuple[str, ...] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row dict). TSV is read with QUOTE_NONE (GLUE files hold bare quotes)."""
    if fmt == "jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}: row {lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{path}: row {lineno}: expected a JSON object")
                yield lineno, row
        return
    delimiter = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        names = list(column_names) if column_names else None
        for lineno, cells in enumerate(reader, 1):
            if names is None:
                if header:
                    names = [c.strip() for c in cells]
                    continue
                names = [str(i) for i in range(len(cells))]
            if not cells:
                continue
            yield lineno, dict(zip(names, cells, strict=False))


def _examples_from_rows(rows: Iterator[tuple[int, dict[str, Any]]], path: Path, text_columns: tuple[str, ...],
                        label_column: str, labels: tuple[str, ...] | None,
                        ) -> tuple[list[tuple[str, ...]], list[float]]:
    texts: list[tuple[str, ...]] = []
    targets: list[float] = []
    label_index = {name: i for i, name in enumerate(labels)} if labels else None
    for lineno, row in rows:
        for col in (*text_columns, label_column):
            if col not in row or row[col] is None:
                raise ConfigError(f"{path}: row {lineno}: no column {col!r} (columns: {sorted(row)})")
        raw = row[label_column]
        raw_str = str(raw).strip()
        if label_index is not None:
            if raw_str not in label_index:
                raise ConfigError(f"{path}: row {lineno}: label {raw_str!r} is not one of {list(labels)}")
            targets.append(float(label_index[raw_str]))
        else:
            try:
                targets.append(float(raw))
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: row {lineno}: regression label {raw_str!r} is not a number") from None
        texts.append(tuple(str(row[c]) for c in text_columns))
    if not texts:
        raise ConfigError(f"{path}: no data rows")
    return texts, targets


def _fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            stat = part.stat()
            digest.update(f"{part.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def _load_glue_local(spec: GlueSpec, folder: Path, split: str) -> tuple[Path, list, list]:
    path = folder / spec.folder / f"{split}.tsv"
    if not path.is_file():
        raise ConfigError(f"GLUE file not found: {path}")
    rows = _read_table(path, "tsv", header=spec.header, column_names=spec.column_names)
    texts, labels = _examples_from_rows(rows, path, spec.text_columns, spec.label_column, spec.labels)
    return path, texts, labels


def _load_glue_hub(spec: GlueSpec, split: str) -> tuple[list, list]:
    """Read a split of nyu-mll/glue; its labels are already indices in GLUE's label order."""
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_name, split=split)
    except Exception as err:  # no network, no such split: one line, not a traceback
        raise ConfigError(f"GLUE task {spec.hub_name!r}: cannot load split {split!r} from the hub "
                          f"(set data.glue_dir or $MTP_GLUE_DIR for local files): {type(err).__name__}") from None
    texts = list(zip(*(ds[c] for c in spec.hub_text_columns), strict=True))
    labels = [float(x) for x in ds["label"]]
    return texts, labels


def _subsample(texts: list, labels: list, limit: int | None, seed: int) -> tuple[list, list]:
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def load_task(task: TaskConfig, cfg: ExperimentConfig) -> TaskData:
    """Read and check one task's train and dev data (raises ConfigError naming file and row)."""
    name = canonical_task_name(task.name)
    seed = cfg.train.seed
    if task.is_custom:
        data = _load_custom(task)
    elif name in GLUE:
        spec = GLUE[name]
        folder = glue_dir(cfg)
        if folder is not None:
            train_path, train_x, train_y = _load_glue_local(spec, folder, "train")
            dev = {}
            paths = [train_path]
            for split, stem in spec.dev_splits.items():
                path, x, y = _load_glue_local(spec, folder, stem)
                dev[split] = (x, y)
                paths.append(path)
            fp = _fingerprint("glue-local", *paths)
            source = str(folder / spec.folder)
        else:
            train_x, train_y = _load_glue_hub(spec, "train")
            dev = {}
            for split in spec.dev_splits:
                hub_split = "validation" if split == "dev" else f"validation_{split}"
                dev[split] = _load_glue_hub(spec, hub_split)
            fp = _fingerprint("glue-hub", spec.hub_name)
            source = f"hub:nyu-mll/glue/{spec.hub_name}"
        data = TaskData(name=name, labels=spec.labels, metric=spec.metric, weight=task.weight,
                        train_texts=train_x, train_labels=train_y, dev=dev, fingerprint=fp, source=source)
    else:
        raise ConfigError(f"tasks: unknown task {task.name!r} (GLUE tasks: {sorted(GLUE)}; "
                          "a custom task needs train_file)")
    data.weight = task.weight
    if task.metric:
        data.metric = task.metric
    full_train = len(data.train_texts)
    data.train_texts, data.train_labels = _subsample(data.train_texts, data.train_labels,
                                                     task.max_train_examples, seed)
    for split, (x, y) in list(data.dev.items()):
        data.dev[split] = _subsample(x, y, task.max_dev_examples, seed + 1)
    data.fingerprint = _fingerprint(data.fingerprint, task.max_train_examples, task.max_dev_examples, seed)
    data.stats = {"train_rows": full_train, "train_used": len(data.train_texts),
                  "dev_used": {s: len(x) for s, (x, _) in data.dev.items()}}
    return data


def _load_custom(task: TaskConfig) -> TaskData:
    key = f"tasks.{task.name}"
    if not task.dev_file:
        raise ConfigError(f"{key}.dev_file: a custom task needs a dev file")
    if not task.text_columns or len(task.text_columns) > 2:
        raise ConfigError(f"{key}.text_columns: give one column or a pair")
    if not task.label_column:
        raise ConfigError(f"{key}.label_column: missing")
    if task.regression == bool(task.labels):
        raise ConfigError(f"{key}: give either labels (classification) or regression: true")
    labels = tuple(str(x) for x in task.labels) if task.labels else None
    paths = {}
    for which in ("train_file", "dev_file"):
        path = resolve_path(getattr(task, which), f"{key}.{which}")
        fmt = task.format or {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
            path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"{key}.format: cannot infer the format of {path.name}; set csv, tsv or jsonl")
        paths[which] = (path, fmt)
    cols = tuple(task.text_columns)
    train_x, train_y = _examples_from_rows(_read_table(*paths["train_file"]), paths["train_file"][0], cols,
                                           task.label_column, labels)
    dev_x, dev_y = _examples_from_rows(_read_table(*paths["dev_file"]), paths["dev_file"][0], cols,
                                       task.label_column, labels)
    metric = task.metric or ("pearson_spearman" if labels is None else "accuracy")
    fp = _fingerprint("custom", paths["train_file"][0], paths["dev_file"][0], cols, task.label_column, labels)
    return TaskData(name=task.name, labels=labels, metric=metric, weight=task.weight, train_texts=train_x,
                    train_labels=train_y, dev={"dev": (dev_x, dev_y)}, fingerprint=fp,
                    source=str(paths["train_file"][0].parent))


def load_tasks(cfg: ExperimentConfig) -> list[TaskData]:
    return [load_task(t, cfg) for t in cfg.tasks]


# ---------------------------------------------------------------- tokenization


def tokenize_tasks(cfg: ExperimentConfig, tasks: list[TaskData], tokenizer: Any) -> dict[str, dict]:
    """Every task's tokenized splits through the on-disk cache of the config (one process; the trainer's ranks take
    turns filling it)."""
    tok_id = f"{cfg.encoder.tokenizer_name}:{type(tokenizer).__name__}"
    cache = cache_dir(cfg) / "tokenized"
    return {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache, tok_id) for t in tasks}


def tokenize_task(task: TaskData, tokenizer: Any, max_len: int, cache: Path, tokenizer_id: str) -> dict:
    """Tokenize train and dev splits with `datasets.map`, cached on disk by content fingerprint."""
    import datasets

    datasets.disable_progress_bars()
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    splits = {"train": (task.train_texts, task.train_labels)} | {f"dev_{k}": v for k, v in task.dev.items()}
    for split, (texts, labels) in splits.items():
        columns = {f"text{i}": [t[i] for t in texts] for i in range(len(texts[0]))}
        raw = datasets.Dataset.from_dict({**columns, "labels": labels})
        n_text = len(columns)

        def encode(batch: dict[str, list], n_text: int = n_text) -> dict[str, list]:
            args = [batch[f"text{i}"] for i in range(n_text)]
            return tokenizer(*args, truncation=True, max_length=max_len)

        key = _fingerprint(task.fingerprint, split, tokenizer_id, max_len)
        out[split] = raw.map(encode, batched=True, remove_columns=list(columns),
                             cache_file_name=str(cache / f"{task.name}-{split}-{key}.arrow"),
                             load_from_cache_file=True, new_fingerprint=key)
    return out


# ---------------------------------------------------------------- sampling


def task_probabilities(cfg: ExperimentConfig, sizes: dict[str, int]) -> dict[str, float]:
    """p_t for the configured strategy: proportional, temperature (n^(1/T)), uniform or given."""
    s = cfg.sampling
    names = list(sizes)
    if s.strategy == "given":
        given = {canonical_task_name(k): v for k, v in (s.probabilities or {}).items()}
        raw = np.array([given.get(n, given.get(n.lower(), 0.0)) for n in names], dtype=float)
    elif s.strategy == "uniform":
        raw = np.ones(len(names))
    else:
        power = 1.0 if s.strategy == "proportional" else 1.0 / s.temperature
        raw = np.array([sizes[n] for n in names], dtype=float) ** power
    probs = raw / raw.sum()
    return dict(zip(names, probs.tolist(), strict=True))


def train_lengths(split: Any) -> np.ndarray:
    """Tokens per row of a tokenized split."""
    return np.array([len(ids) for ids in split["input_ids"]], dtype=np.int64)


class MultitaskSampler:
    """Draws a task per micro-step and the rank's share of that task's next global batch.

    The task draw uses one generator seeded identically on all ranks, so every rank of the
    data-parallel group takes the same task in the same step. Each task walks a seeded permutation
    of its rows epoch by epoch; rank r takes rows [r*b, (r+1)*b) of each global batch of b*world rows.
    The whole state is a few integers and the generator state: `state_dict` puts it in checkpoints.
    """

    def __init__(self, sizes: dict[str, int], probs: dict[str, float], micro_batch: int, rank: int,
                 world: int, seed: int, lengths: dict[str, np.ndarray] | None = None, length_buckets: int = 0):
        if length_buckets and lengths is None:
            raise ValueError("length_buckets needs the rows' lengths")
        self.lengths, self.length_buckets = lengths, length_buckets
        self.names = list(sizes)
        self.sizes = sizes
        self.probs = np.array([probs[n] for n in self.names])
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world, seed
        self.global_batch = micro_batch * world
        for name, n in sizes.items():
            if n < self.global_batch:
                raise ConfigError(f"tasks.{name}: {n} training rows is fewer than one global batch "
                                  f"({micro_batch} x {world} ranks)")
        self.rng = np.random.default_rng(seed)
        self.epoch = dict.fromkeys(self.names, 0)
        self.cursor = dict.fromkeys(self.names, 0)
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}

    def _permutation(self, task_idx: int, name: str) -> np.ndarray:
        epoch = self.epoch[name]
        cached = self._perm_cache.get(name)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, task_idx, epoch]).permutation(self.sizes[name])
            if self.length_buckets:
                perm = self._bucketed(perm, self.lengths[name], np.random.default_rng([self.seed, task_idx, epoch, 1]))
            self._perm_cache[name] = cached = (epoch, perm)
        return cached[1]

    def _bucketed(self, perm: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The epoch's permutation with rows of like length batched together: each window of `length_buckets`
        global batches sorted by length, cut into global batches, and the windows' batches shuffled. The epoch holds
        the same rows; a micro-batch pads to a length near its rows' own."""
        window = self.length_buckets * self.global_batch
        usable = len(perm) - len(perm) % self.global_batch
        batches = []
        for start in range(0, usable, window):
            chunk = perm[start:min(start + window, usable)]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        order = rng.permutation(len(batches))
        return np.concatenate([*(batches[i] for i in order), perm[usable:]])

    def next(self) -> tuple[str, np.ndarray]:
        """The next (task, this rank's row indices)."""
        task_idx = int(self.rng.choice(len(self.names), p=self.probs))
        name = self.names[task_idx]
        if self.cursor[name] + self.global_batch > self.sizes[name]:
            self.epoch[name] += 1
            self.cursor[name] = 0
        perm = self._permutation(task_idx, name)
        start = self.cursor[name] + self.rank * self.micro_batch
        self.cursor[name] += self.global_batch
        return name, perm[start:start + self.micro_batch]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "epoch": dict(self.epoch), "cursor": dict(self.cursor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch.update(state["epoch"])
        self.cursor.update(state["cursor"])


def eval_shard(lengths: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's eval batches: rows sorted by length, dealt round-robin, padded to equal batch counts.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
    padding rows repeat a real row and are dropped again when predictions are gathered by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    mine = order[rank::world]
    per_rank = -(-len(lengths) // world)
    mine += [order[-1]] * (per_rank - len(mine))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
