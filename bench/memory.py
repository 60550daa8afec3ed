"""Per-rank memory of training BERT-large (random weights from configs/arch/) under ZeRO-0/2/3 at 1 and 2 ranks,
dense and pruned: each case is a real `launch.sh` run whose ranks sample their resident memory phase by phase
($MTP_MEMORY_PROFILE, mtp/training/memory.py).

    python bench/memory.py                       # CPU, fp32: writes bench/results/memory.json
    python bench/memory.py --quick               # the 2-rank ZeRO-3 case and the 1-rank ZeRO-0 reference only
    python bench/memory.py --quick --steps 8 --out bench/results/memory_8steps.json   # the first step weighs less
    python bench/memory.py --model configs/arch/tiny-bert --steps 4 --out /tmp/m.json   # smoke mode

Rows: zero, world_size, model, method, per_rank_peak_mib (the highest RSS of any rank, whole run), per_rank_steady_mib
(the median RSS of the training phase, highest rank), and each rank's phases; `reference` is the 1-rank ZeRO-0 dense
run; each row's steady and peak over it, and for pruned rows over the 1-rank ZeRO-0 run of the same method.
The file is written after every case; `--append` adds cases to it. With $MTP_MEMORY_TENSORS=1 each rank also
counts its live tensors at every phase change (a diagnosis: the trims it makes lower what follows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"dense": [], "rank": ["pruning.method=rank", "pruning.budget=0.5"],
           "movement": ["pruning.method=movement", "pruning.budget=0.5"]}


def run_case(model: str, zero: int, world: int, method: str, steps: int, work: Path, port: int) -> dict:
    out, profile = work / f"z{zero}-w{world}-{method}", work / f"profile-z{zero}-w{world}-{method}"
    args = ["bash", str(ROOT / "launch.sh"), "--nproc", str(world), "--master_port", str(port),
            "--config", "configs/tiny.yaml", f"encoder.name={model}", "encoder.random_init=true",
            f"train.deepspeed_config=ds_configs/cpu_zero{zero}.json", "train.micro_batch_size=2",
            "data.max_seq_len=64", f"train.max_steps={steps}", "train.log_every=1", "train.eval_batch_size=8",
            "tasks.rte.max_dev_examples=16", "tasks.stsb.max_dev_examples=16", *METHODS[method], f"output_dir={out}"]
    env = dict(os.environ, MTP_MEMORY_PROFILE=str(profile), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               DS_ACCELERATOR="cpu", PYTHON=sys.executable)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"z{zero} w{world} {method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(profile.glob("rank*.json"))]
    shutil.rmtree(out, ignore_errors=True)
    return {"zero": zero, "world_size": world, "model": Path(model).name, "method": method, "code": code_version(),
            "per_rank_peak_mib": max(p["peak_mib"] for r in ranks for p in r["phases"].values()),
            "per_rank_steady_mib": max(r["phases"]["train"]["median_mib"] for r in ranks),
            "ranks": {str(r["rank"]): r["phases"] for r in ranks},
            **({"tensors": {str(r["rank"]): r["tensors"] for r in ranks}} if ranks[0].get("tensors") else {})}


def reference_of(rows: list[dict], method: str) -> dict | None:
    return next((r for r in rows if r["zero"] == 0 and r["world_size"] == 1 and r["method"] == method), None)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    """The JSON: every row with its ratios to the 1-rank ZeRO-0 dense reference and, for pruned rows, to the
    1-rank ZeRO-0 run of the same method (rank pruning's full-rank start holds more parameters than dense)."""
    reference = reference_of(rows, "dense")
    for r in rows:
        for name, ref in (("reference", reference), ("same_method_zero0", reference_of(rows, r["method"]))):
            if ref is not None:
                r[f"steady_over_{name}"] = round(r["per_rank_steady_mib"] / ref["per_rank_steady_mib"], 3)
                r[f"peak_over_{name}"] = round(r["per_rank_peak_mib"] / ref["per_rank_peak_mib"], 3)
    result = {"device": "cpu", "precision": "fp32", "micro_batch": 2, "seq_len": 64, "steps": args.steps,
              "model": Path(args.model).name, "code": code_version(),  # each row also names the commit it ran
              "reference": None if reference is None else {k: reference[k] for k in (
                  "zero", "world_size", "method", "per_rank_peak_mib", "per_rank_steady_mib")},
              "targets": {"zero3_2ranks_steady_over_reference": 0.6, "zero3_2ranks_peak_over_reference": 0.7},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


def code_version() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/arch/bert-large-uncased")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="the 1-rank ZeRO-0 reference and 2-rank ZeRO-3 only")
    parser.add_argument("--cases", nargs="*", default=None, metavar="ZERO:RANKS:METHOD",
                        help="run only these (e.g. 3:2:dense); ratios need the reference 0:1:dense among them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (a case measured again replaces its row)")
    args = parser.parse_args()
    cases = [(0, 1, "dense"), (3, 2, "dense")] if args.quick else [
        (zero, world, method) for method in METHODS for world in (1, 2) for zero in (0, 2, 3)]
    if args.cases:
        cases = [(int(z), int(w), m) for z, w, m in (c.split(":") for c in args.cases)]
    rows: list[dict] = []
    if args.append and args.out.exists():  # rows of an earlier invocation, less the cases measured again now
        earlier = json.loads(args.out.read_text())
        rows = [{**r, "code": r.get("code", earlier.get("code"))} for r in earlier["rows"]
                if (r["zero"], r["world_size"], r["method"]) not in cases]
    work = Path(tempfile.mkdtemp(prefix="mtp-memory-"))
    try:
        for i, (zero, world, method) in enumerate(cases):
            rows.append(run_case(args.model, zero, world, method, args.steps, work, 29700 + i))
            r = rows[-1]
            print(f"zero {zero} ranks {world} {method}: peak {r['per_rank_peak_mib']:.0f} MiB, "
                  f"steady {r['per_rank_steady_mib']:.0f} MiB", flush=True)
            write(args, rows)  # after every case: a failed or stopped case keeps the others
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
