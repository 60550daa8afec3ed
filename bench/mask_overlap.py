"""What two element-wise pruned runs keep, matrix by matrix: each run's kept fraction, the overlap of the two kept
sets (Jaccard, and the share of one run's kept weights the other keeps too), and how large the kept weights are
(mean |W| of the kept entries over the matrix's mean |W|, in each run's own final weights).

    python bench/mask_overlap.py RUN_A RUN_B [--out bench/results/mask_overlap.json]

Both runs must be finished element-wise runs (magnitude, movement, soft movement) of the same encoder: their
`final/model.safetensors` holds a 0/1 `mask` beside each prunable `weight`. The per-type and per-layer rows sum
the matrices of that type or layer. A run that keeps small weights (|W| ratio near or below 1) where the other keeps
large ones has chosen by something other than size; the overlap says how different the two choices are.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtp.model import PRUNABLE_BY_ARCH  # noqa: E402

LAYER = re.compile(r"\.layer\.(\d+)\.")


def masked_matrices(run: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bool mask) of every masked matrix of a finished run, by its path."""
    state = load_file(str(run / "final" / "model.safetensors"))
    paths = sorted(k[: -len(".mask")] for k in state if k.endswith(".mask"))
    if not paths:
        raise SystemExit(f"{run}: final/model.safetensors holds no masks (not an element-wise pruned run)")
    return {p: (state[f"{p}.weight"].float(), state[f"{p}.mask"].bool()) for p in paths}


def kind_of(path: str) -> str:
    """The matrix type (query, key, value, attn_out, ffn_in, ffn_out) of a prunable path, by its suffix."""
    suffixes = sorted(((suffix, kind) for names in PRUNABLE_BY_ARCH.values() for kind, suffix in names.items()),
                      key=lambda pair: -len(pair[0]))  # the longest first: attention.output.dense before output.dense
    return next((kind for suffix, kind in suffixes if path.endswith("." + suffix)), "other")


def compare(a: dict[str, tuple[torch.Tensor, torch.Tensor]], b: dict[str, tuple[torch.Tensor, torch.Tensor]]
            ) -> dict[str, Any]:
    """Overall, per matrix type and per layer: kept fractions, overlap, and kept |W| over the matrix mean."""
    if set(a) != set(b):
        raise SystemExit("the two runs mask different matrices (not the same encoder)")
    groups: dict[str, dict[str, float]] = {}

    def add(group: str, values: dict[str, float]) -> None:
        acc = groups.setdefault(group, {})
        for key, value in values.items():
            acc[key] = acc.get(key, 0.0) + value

    for path in a:
        (wa, ma), (wb, mb) = a[path], b[path]
        values = {"entries": ma.numel(), "kept_a": int(ma.sum()), "kept_b": int(mb.sum()),
                  "both": int((ma & mb).sum()), "either": int((ma | mb).sum()),
                  "abs_kept_a": float(wa.abs()[ma].sum()), "abs_kept_b": float(wb.abs()[mb].sum()),
                  "abs_all_a": float(wa.abs().sum()), "abs_all_b": float(wb.abs().sum())}
        layer = LAYER.search(path)
        for group in ("all", f"type/{kind_of(path)}", f"layer/{layer.group(1) if layer else '?'}"):
            add(group, values)
    rows = {}
    for group, v in groups.items():
        rows[group] = {
            "kept_fraction_a": v["kept_a"] / v["entries"], "kept_fraction_b": v["kept_b"] / v["entries"],
            "jaccard": v["both"] / v["either"] if v["either"] else 1.0,
            "a_kept_by_b": v["both"] / v["kept_a"] if v["kept_a"] else None,
            "kept_abs_over_mean_a": (v["abs_kept_a"] / v["kept_a"]) / (v["abs_all_a"] / v["entries"])
            if v["kept_a"] else None,
            "kept_abs_over_mean_b": (v["abs_kept_b"] / v["kept_b"]) / (v["abs_all_b"] / v["entries"])
            if v["kept_b"] else None}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mask_overlap.json"))
    args = parser.parse_args()
    rows = compare(masked_matrices(args.run_a), masked_matrices(args.run_b))
    report = {"benchmark": "mask_overlap", "command": " ".join(["python bench/mask_overlap.py", *sys.argv[1:]]),
              "run_a": str(args.run_a), "run_b": str(args.run_b), "groups": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for group in ["all", *sorted(g for g in rows if g != "all")]:
        r = rows[group]
        print(f"{group:16s} kept {r['kept_fraction_a']:.3f} / {r['kept_fraction_b']:.3f}  jaccard {r['jaccard']:.3f}  "
              f"|W| kept/mean {r['kept_abs_over_mean_a'] or 0:.2f} / {r['kept_abs_over_mean_b'] or 0:.2f}")


if __name__ == "__main__":
    main()
