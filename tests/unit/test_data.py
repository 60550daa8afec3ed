"""Custom-task reading, the hub path, task probabilities, the multitask sampler and eval sharding: no GLUE files
needed (the GLUE files themselves are read in tests/integration/test_data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtp.config import ConfigError, load_config
from mtp.data import MultitaskSampler, eval_shard, load_task, task_probabilities
from tests.conftest import ROOT


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_custom_task_formats(tmp_path: Path, fmt: str) -> None:
    rows = [("a cat sat", "on a mat", "2.5"), ("dogs run", "fast", "4.0"), ("x", "y", "0")]
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        import json

        path.write_text("".join(json.dumps({"s1": a, "s2": b, "y": float(y)}) + "\n" for a, b, y in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text("s1" + sep + "s2" + sep + "y\n" + "".join(sep.join(r) + "\n" for r in rows))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"tasks=[{{name: sim, train_file: {path}, dev_file: {path}, text_columns: [s1, s2], label_column: y, "
        "regression: true}]"])
    data = load_task(cfg.tasks[0], cfg)
    assert data.train_texts == [r[:2] for r in rows]
    assert data.train_labels == [2.5, 4.0, 0.0]
    assert data.is_regression and data.metric == "pearson_spearman"


def test_custom_task_missing_column_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhello,pos\n")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"tasks=[{{name: c, train_file: {path}, dev_file: {path}, text_columns: [text], label_column: label, "
        "labels: [neg, pos]}]"])
    with pytest.raises(ConfigError, match=r"t\.csv: row 2: no column 'text'"):
        load_task(cfg.tasks[0], cfg)


def test_task_probabilities() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    sizes = {"rte": 100, "stsb": 400}
    cfg.sampling.strategy = "proportional"
    assert task_probabilities(cfg, sizes) == pytest.approx({"rte": 0.2, "stsb": 0.8})
    cfg.sampling.strategy = "temperature"
    cfg.sampling.temperature = 2.0
    assert task_probabilities(cfg, sizes) == pytest.approx({"rte": 10 / 30, "stsb": 20 / 30})
    cfg.sampling.strategy = "uniform"
    assert task_probabilities(cfg, sizes) == pytest.approx({"rte": 0.5, "stsb": 0.5})


def test_sampler_same_task_on_all_ranks_disjoint_rows_and_resumable() -> None:
    sizes, probs = {"a": 50, "b": 200}, {"a": 0.3, "b": 0.7}
    ranks = [MultitaskSampler(sizes, probs, micro_batch=4, rank=r, world=2, seed=7) for r in range(2)]
    draws = [[s.next() for _ in range(40)] for s in ranks]
    for (task0, rows0), (task1, rows1) in zip(*draws, strict=True):
        assert task0 == task1
        assert len(rows0) == len(rows1) == 4 and not set(rows0) & set(rows1)
    counts = {t: sum(d[0] == t for d in draws[0]) for t in sizes}
    assert counts["b"] > counts["a"] > 0
    # a sampler restored from a state continues exactly as the original does
    original = MultitaskSampler(sizes, probs, 4, 0, 2, seed=7)
    for _ in range(13):
        original.next()
    restored = MultitaskSampler(sizes, probs, 4, 0, 2, seed=7)
    restored.load_state_dict(original.state_dict())
    for _ in range(30):
        (ta, ra), (tb, rb) = original.next(), restored.next()
        assert ta == tb and np.array_equal(ra, rb)


def test_sampler_walks_epochs_without_repeats() -> None:
    sampler = MultitaskSampler({"a": 20}, {"a": 1.0}, micro_batch=5, rank=0, world=2, seed=0)
    first_epoch = np.concatenate([sampler.next()[1] for _ in range(2)])
    assert len(set(first_epoch.tolist())) == 10


def pad_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    return 1 - real / sum(len(b) * int(lengths[b].max()) for b in batches)


@pytest.mark.parametrize("world", [1, 2])
def test_length_buckets_keep_each_epochs_rows_and_cut_the_padding(world: int) -> None:
    """With `length_buckets` an epoch holds the rows plain shuffling gives it (each once), every rank still takes its
    own share of one global batch, a restored sampler continues the same, and micro-batches pad far less."""
    rng = np.random.default_rng(0)
    lengths = {"a": rng.integers(5, 120, 300), "b": rng.integers(5, 60, 96)}
    sizes, probs = {k: len(v) for k, v in lengths.items()}, {"a": 0.7, "b": 0.3}

    def sampler(rank: int, buckets: int) -> MultitaskSampler:
        return MultitaskSampler(sizes, probs, 4, rank, world, seed=3, lengths=lengths, length_buckets=buckets)

    plain, bucketed = [sampler(0, 0)], [sampler(r, 8) for r in range(world)]
    draws = [[s.next() for _ in range(150)] for s in bucketed]
    plain_draws = [plain[0].next() for _ in range(150)]
    for step in zip(*draws, strict=True):
        assert len({task for task, _ in step}) == 1
        assert not set(step[0][1]) & set(step[-1][1]) or world == 1
    rows_a = [rows for task, rows in draws[0] if task == "a"][: 300 // (4 * world)]  # one epoch of task a
    seen = np.concatenate(rows_a)
    assert len(set(seen.tolist())) == len(seen)  # no row twice within the epoch
    assert pad_share(lengths["a"], [r for t, r in draws[0] if t == "a"]) < 0.5 * pad_share(
        lengths["a"], [r for t, r in plain_draws if t == "a"])
    original = sampler(0, 8)
    for _ in range(37):
        original.next()
    restored = sampler(0, 8)
    restored.load_state_dict(original.state_dict())
    for _ in range(60):
        (ta, ra), (tb, rb) = original.next(), restored.next()
        assert ta == tb and np.array_equal(ra, rb)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shard_covers_every_row_with_equal_batches(world: int) -> None:
    lengths = [5, 3, 9, 1, 7, 2, 8]
    shards = [eval_shard(lengths, batch_size=2, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank
    seen = {i for s in shards for batch in s for i in batch}
    assert seen == set(range(len(lengths)))


def test_hub_path_reads_nyu_mll_glue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a local folder, GLUE comes from the hub's nyu-mll/glue, whose labels are already indices."""
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [2, 0],
                                           "idx": [0, 1]})

    monkeypatch.delenv("MTP_GLUE_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["tasks=[{name: mnli}]"])
    data = load_task(cfg.tasks[0], cfg)
    assert calls == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_matched"),
                     ("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert data.train_texts == [("a", "c"), ("b", "d")] and data.train_labels == [2.0, 0.0]
    assert set(data.dev) == {"matched", "mismatched"} and data.source == "hub:nyu-mll/glue/mnli"
