"""GLUE files read in full (row counts, first rows) and seeded subsampling: these need the GLUE files."""

from __future__ import annotations

import pytest

from mtp.config import load_config
from mtp.data import GLUE, load_task
from tests.conftest import ROOT

# data rows per file, from the GLUE folder's README
GLUE_ROWS = {"cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277), "sst2": (67349, 872),
             "stsb": (5749, 1500), "wnli": (635, 71)}


@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_glue_files_parse_completely(task: str) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"tasks=[{{name: {task}}}]"])
    data = load_task(cfg.tasks[0], cfg)
    train, dev = GLUE_ROWS[task]
    assert len(data.train_texts) == train and len(data.dev["dev"][0]) == dev
    spec = GLUE[task]
    assert all(len(t) == len(spec.text_columns) for t in data.train_texts)
    if spec.labels is None:
        assert min(data.train_labels) >= 0.0 and max(data.train_labels) <= 5.0
    else:
        assert set(data.train_labels) == set(range(len(spec.labels)))


def test_glue_first_rows_match_the_files() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["tasks=[{name: rte}, {name: cola}, {name: mrpc}]"])
    rte, cola, mrpc = (load_task(t, cfg) for t in cfg.tasks)
    assert rte.train_texts[0] == ("No Weapons of Mass Destruction Found in Iraq Yet.",
                                  "Weapons of Mass Destruction Found in Iraq.")
    assert rte.train_labels[0] == 1.0  # not_entailment
    assert cola.train_texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert cola.train_labels[0] == 1.0
    assert mrpc.train_labels[0] == 1.0 and mrpc.train_texts[0][0].startswith("Amrozi accused his brother")


def test_subsampling_is_seeded() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    a, b = load_task(cfg.tasks[0], cfg), load_task(cfg.tasks[0], cfg)
    assert len(a.train_texts) == 64 and a.train_texts == b.train_texts














