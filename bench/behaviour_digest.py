"""A digest of what training produces, to tell whether a refactor changed behaviour: tiny runs of every method
(and distillation with init_from, ZeRO-3 on 2 ranks, a stopped-and-resumed run), each run's results.json less its
wall time, and a sha256 of every tensor of final/model.safetensors. Two checkouts give the same JSON bit for bit
when they train the same models.

    MTP_GLUE_DIR=/path/to/glue python bench/behaviour_digest.py --repo . --out digest.json
    python bench/behaviour_digest.py --compare before.json after.json

With --accelerator-paths the pruning hooks take the paths they take on an accelerator (no host reads; rank's gates
drawn for all layers at once), so that a change to those paths is checked on a CPU.

A change that draws its noise in another order cannot match bit for bit: `--seeds 0 1 2 3 4` trains every case once
per seed, and `--compare before.json after.json --seed-spread` passes when the mean change of the training loss and
of the dev mean, paired by seed, is within two standard errors of the paired changes (and one seed standard
deviation).

With --bf16 every case trains under bf16 on DeepSpeed ZeRO-2 (the CPU accelerator emulates bf16): bf16 changes
are not bit for bit, so `--compare ... --loss-tolerance 0.01` passes when every loss of the two histories agrees
within that relative tolerance and every dev score within --score-tolerance points.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

CASES: dict[str, list[str]] = {
    "dense": [],
    "magnitude": ["pruning.method=magnitude", "pruning.budget=0.5", "pruning.finetune_ratio=0.25"],
    "movement": ["pruning.method=movement", "pruning.budget=0.5"],
    "movement_fixed": ["pruning.method=movement", "pruning.budget=0.5", "pruning.finetune_ratio=0.25"],
    "soft_movement_fixed": ["pruning.method=soft_movement", "pruning.budget=0.5", "pruning.soft_lambda=10",
                            "pruning.finetune_ratio=0.25"],
    "movement_global": ["pruning.method=movement", "pruning.budget=0.4", "pruning.scope=global"],
    "soft_movement": ["pruning.method=soft_movement", "pruning.budget=0.5", "pruning.soft_lambda=10"],
    "rank": ["pruning.method=rank", "pruning.budget=0.5", "pruning.finetune_ratio=0.25"],
    "rank_distill": ["pruning.method=rank", "pruning.budget=0.5", "distill.teacher=RUN:dense",
                     "distill.hidden_weight=1.0", "encoder.init_from=RUN:dense"],
    "structured": ["pruning.method=structured", "pruning.budget=0.5", "pruning.finetune_ratio=0.25"],
    "magnitude_zero3_2ranks": ["pruning.method=magnitude", "pruning.budget=0.3",
                               "train.deepspeed_config=ds_configs/cpu_zero3.json", "NPROC:2"],
    "dense_zero3": ["train.deepspeed_config=ds_configs/cpu_zero3.json"],
    "movement_fixed_zero3": ["pruning.method=movement", "pruning.budget=0.5", "pruning.finetune_ratio=0.25",
                             "train.deepspeed_config=ds_configs/cpu_zero3.json"],
    "rank_zero3": ["pruning.method=rank", "pruning.budget=0.5", "pruning.finetune_ratio=0.25",
                   "train.deepspeed_config=ds_configs/cpu_zero3.json"],
    # every encoder parameter partitioned (no persistence threshold): the layers are fetched and released whole
    "rank_zero3_partitioned": ["pruning.method=rank", "pruning.budget=0.5", "pruning.finetune_ratio=0.25",
                               "ZERO3_PARTITIONED"],
    "movement_fixed_zero3_partitioned": ["pruning.method=movement", "pruning.budget=0.5",
                                         "pruning.finetune_ratio=0.25", "ZERO3_PARTITIONED"],
    "movement_resume": ["pruning.method=movement", "pruning.budget=0.5", "train.stop_after_steps=6", "RESUME"],
}
BASE = ["--config", "configs/tiny.yaml", "train.deepspeed_config=ds_configs/cpu_zero0.json", "train.max_steps=12",
        "train.checkpoint_every=6"]


def digest(run: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    results = json.loads((run / "results.json").read_text())
    results.pop("wall_time_s", None)
    glue = os.environ.get("MTP_GLUE_DIR")
    for entry in results.get("data", {}).values():  # this machine's data folder, as a committed digest names it
        if glue and str(entry.get("source", "")).startswith(glue.rstrip("/") + "/"):
            entry["source"] = "$MTP_GLUE_DIR/" + entry["source"][len(glue.rstrip("/")) + 1:]
    state = load_file(str(run / "final" / "model.safetensors"))
    results["tensors"] = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                          for k, v in sorted(state.items())}
    return results


def derived_config(repo: Path, work: Path, source: str, name: str, change: Callable[[dict], None]) -> Path:
    """ds_configs/`source` with `change` applied, written into the work folder as `name`."""
    ds = json.loads((repo / "ds_configs" / source).read_text())
    change(ds)
    path = work / name
    path.write_text(json.dumps(ds))
    return path


def bf16_config(repo: Path, work: Path) -> Path:
    """ds_configs/cpu_zero2.json with bf16 on."""
    return derived_config(repo, work, "cpu_zero2.json", "bf16_zero2.json", lambda ds: ds.update(bf16={"enabled": True}))


def zero3_partitioned_config(repo: Path, work: Path) -> Path:
    """ds_configs/cpu_zero3.json with no parameter kept whole (persistence threshold 0): the tiny model's tensors are
    all under the file's threshold, so otherwise none is ever partitioned."""
    return derived_config(repo, work, "cpu_zero3.json", "zero3_partitioned.json",
                          lambda ds: ds["zero_optimization"].update(stage3_param_persistence_threshold=0))


def run_case(repo: Path, work: Path, name: str, env: dict[str, str], bf16: bool = False,
             seed: int | None = None) -> dict:
    args, nproc, resume = list(CASES[name]), "1", "RESUME" in CASES[name]
    if seed is not None:
        args.append(f"train.seed={seed}")
    if bf16:
        args = [a for a in args if not a.startswith("train.deepspeed_config=")]
        args.append(f"train.deepspeed_config={bf16_config(repo, work)}")
    args = [a for a in args if a != "RESUME"]
    if "ZERO3_PARTITIONED" in args:
        args.remove("ZERO3_PARTITIONED")
        args.append(f"train.deepspeed_config={zero3_partitioned_config(repo, work)}")
    for a in [a for a in args if a.startswith("NPROC:")]:
        nproc = a.split(":")[1]
        args.remove(a)
    args = [a.replace("RUN:", f"{work}/") for a in args]
    cmd = ["bash", str(repo / "launch.sh"), "--nproc", nproc, "--master_port", "29611", *BASE, *args,
           f"output_dir={work / (name if seed is None else f'{name}-seed{seed}')}"]
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    if resume:
        subprocess.run([c for c in cmd if not c.startswith("train.stop_after_steps")] + ["--resume"], cwd=repo,
                       env=env, check=True, capture_output=True)
    return digest(work / (name if seed is None else f"{name}-seed{seed}"))


def compare_within(a: dict, b: dict, loss_tolerance: float, score_tolerance: float) -> int:
    """Cases whose loss histories differ by more than `loss_tolerance` (relative) or whose dev scores differ by
    more than `score_tolerance` points; each case's worst differences printed."""
    failing = 0
    for case in sorted(set(a) | set(b)):
        x, y = a.get(case, {}), b.get(case, {})
        lx, ly = x.get("loss_history", []), y.get("loss_history", [])
        if len(lx) != len(ly) or not lx:
            print(f"{case}: loss histories of {len(lx)} and {len(ly)} entries")
            failing += 1
            continue
        loss = max(abs(p["loss"] - q["loss"]) / max(abs(p["loss"]), 1e-12) for p, q in zip(lx, ly, strict=True))
        tx, ty = x.get("tasks") or {}, y.get("tasks") or {}
        score = max((abs(tx[t]["score"] - ty[t]["score"]) if t in tx and t in ty else float("inf")
                     for t in set(tx) | set(ty)), default=0.0)  # a task scored on one side only fails the case
        ok = loss <= loss_tolerance and score <= score_tolerance
        failing += not ok
        print(f"{case}: loss differs by {loss:.2e} at most (relative), dev scores by {score:.3f} points: "
              f"{'within' if ok else 'OUTSIDE'} the tolerance")
    return int(failing > 0)


def seed_summary(runs: dict, case: str) -> tuple[list[float], list[float]]:
    """Each seed's mean training loss (over the logged windows) and dev mean of `case` (entries `case@seedN`)."""
    found = [r for key, r in sorted(runs.items()) if key.rsplit("@seed", 1)[0] == case and "@seed" in key]
    return ([statistics.fmean(p["loss"] for p in r["loss_history"]) for r in found],
            [r["mean_score"] for r in found])


def compare_seeds(a: dict, b: dict) -> int:
    """For a change that draws its noise differently (no bit-for-bit check can hold): per case, each seed's mean
    training loss and dev mean before and after, paired by seed; passes when the mean of the paired differences is
    within two standard errors of those differences (and, as a coarser check, within one seed standard deviation)."""
    failing = 0
    for case in sorted({k.rsplit("@seed", 1)[0] for k in set(a) | set(b) if "@seed" in k}):
        (la, sa), (lb, sb) = seed_summary(a, case), seed_summary(b, case)
        if len(la) < 2 or len(la) != len(lb):
            print(f"{case}: {len(la)} and {len(lb)} seeds")
            failing += 1
            continue
        loss_spread = max(statistics.stdev(la), statistics.stdev(lb))
        score_spread = max(statistics.stdev(sa), statistics.stdev(sb))
        loss_gap = statistics.fmean(lb) - statistics.fmean(la)
        score_gap = statistics.fmean(sb) - statistics.fmean(sa)
        loss_se = statistics.stdev([y - x for x, y in zip(la, lb, strict=True)]) / len(la) ** 0.5
        score_se = statistics.stdev([y - x for x, y in zip(sa, sb, strict=True)]) / len(sa) ** 0.5
        ok = (abs(loss_gap) <= max(2 * loss_se, 1e-12) and abs(score_gap) <= max(2 * score_se, 1e-9)
              and abs(loss_gap) <= loss_spread and abs(score_gap) <= score_spread)
        failing += not ok
        print(f"{case} ({len(la)} seeds): mean loss {statistics.fmean(la):.4f} -> {statistics.fmean(lb):.4f} "
              f"({loss_gap:+.4f}; paired se {loss_se:.4f}, seed sd {loss_spread:.4f}); dev mean "
              f"{statistics.fmean(sa):.2f} -> {statistics.fmean(sb):.2f} ({score_gap:+.2f}; paired se {score_se:.2f}, "
              f"seed sd {score_spread:.2f}): {'within' if ok else 'OUTSIDE'} two paired standard errors")
    return int(failing > 0)


def compare(before: Path, after: Path, loss_tolerance: float | None = None, score_tolerance: float = 1.0,
            seed_spread: bool = False) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    if seed_spread:
        return compare_seeds(a, b)
    if loss_tolerance is not None:
        return compare_within(a, b, loss_tolerance, score_tolerance)
    differing = 0
    for case in sorted(set(a) | set(b)):
        x, y = a.get(case, {}), b.get(case, {})
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        differing += bool(keys)
        print(f"{case}: {'identical' if not keys else 'differs in ' + ', '.join(keys)}")
    return int(differing > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--out", type=Path, default=Path("behaviour_digest.json"))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--bf16", action="store_true", help="train every case under bf16 on ZeRO-2")
    parser.add_argument("--accelerator-paths", action="store_true",
                        help="the pruning hooks take an accelerator's paths (no host reads) on the CPU")
    parser.add_argument("--loss-tolerance", type=float, help="with --compare: relative tolerance on every loss")
    parser.add_argument("--score-tolerance", type=float, default=1.0, help="with --loss-tolerance: dev points")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every case once per seed (train.seed)")
    parser.add_argument("--seed-spread", action="store_true",
                        help="with --compare of --seeds digests: the mean change, paired by seed, within two standard "
                        "errors")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare, args.loss_tolerance, args.score_tolerance, args.seed_spread)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHON=sys.executable)
    if args.accelerator_paths:
        env["MTP_ACCELERATOR_PATHS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="mtp-digest-"))
    env.setdefault("MTP_CACHE_DIR", str(work / "cache"))
    out = {}
    try:
        teacher = ["dense"] if "rank_distill" in args.cases and (args.seeds or "dense" not in args.cases) else []
        for name in teacher:  # rank_distill's teacher, at its own seed (the folder RUN:dense names)
            out[name] = run_case(args.repo.resolve(), work, name, env, args.bf16)
            print(name, out[name].get("mean_score"), flush=True)
        for name in args.cases:
            for seed in args.seeds or [None]:
                key = name if seed is None else f"{name}@seed{seed}"
                if key not in out:
                    out[key] = run_case(args.repo.resolve(), work, name, env, args.bf16, seed)
                    print(key, out[key].get("mean_score"), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
