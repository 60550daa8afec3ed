"""The recipe fingerprint of every planned run of every shipped comparison config, as JSON: a refactor must leave
each one unchanged (finished runs stay current), a changed recipe must change exactly the runs it changes.

    python bench/plan_fingerprints.py --out after.json
    python bench/plan_fingerprints.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtp.compare.config import load_compare_config  # noqa: E402
from mtp.compare.plan import ComparePlan  # noqa: E402


def fingerprints() -> dict[str, dict[str, str]]:
    """configs/compare_*.yaml -> run name -> fingerprint."""
    out = {}
    for path in sorted((ROOT / "configs").glob("compare_*.yaml")):
        cfg = load_compare_config(path)
        plan = ComparePlan.build(cfg, ROOT / cfg.base)
        out[f"configs/{path.name}"] = {spec.name: plan.fingerprint(spec) for spec in plan.runs}
    return out


def compare(before: Path, after: Path) -> int:
    """Print, per config, the runs whose fingerprint changed, and apart from them the runs the plan gained or lost (a
    new method or size plans new runs: no finished run goes stale by it). Exit 1 only when a run changed."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    changed = 0
    for config in sorted(set(a) | set(b)):
        x, y = a.get(config, {}), b.get(config, {})
        differ = sorted(k for k in set(x) & set(y) if x[k] != y[k])
        added, removed = sorted(set(y) - set(x)), sorted(set(x) - set(y))
        changed += len(differ)
        parts = ["all identical" if not differ else "changed: " + ", ".join(differ)]
        parts += [f"{len(added)} new ({', '.join(added[:5])}{', ...' if len(added) > 5 else ''})"] if added else []
        parts += [f"{len(removed)} no longer planned ({', '.join(removed[:5])}{', ...' if len(removed) > 5 else ''})"
                  ] if removed else []
        print(f"{config}: {len(y)} runs, " + "; ".join(parts))
    return int(changed > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("plan_fingerprints.json"))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    args.out.write_text(json.dumps(fingerprints(), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
