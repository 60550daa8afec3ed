"""A finished mtp run made small enough to carry to a machine without the hub or the packaged MiniLM.

    python bench/pack_run.py RUN_DIR OUT_DIR [--dtype bfloat16]

OUT_DIR gets `final/model.safetensors` (floating tensors cast to --dtype: half the bytes of fp32 in bf16),
`final/mtp.json` with encoder.name pointing at OUT_DIR/encoder, and `encoder/`: the encoder's config and
tokenizer, no weights. On the other machine, OUT_DIR serves as `encoder.init_from` and `distill.teacher`, and
OUT_DIR/encoder as `encoder.name` with `encoder.random_init=true` (init_from overwrites every encoder weight).
The cast rounds every weight to 8 significant bits (bf16): read what the run makes from it against that.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import common  # noqa: F401  (puts the project on sys.path)
import torch
from safetensors.torch import load_file, save_file

from mtp.config import saved_config
from mtp.model import load_tokenizer, resolve_encoder_path

ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "merges.txt", "vocab.json")


def pack(run_dir: Path, out: Path, dtype: torch.dtype) -> dict[str, float]:
    """Write the packed copy of `run_dir` to `out`; return the sizes in MiB before and after."""
    final = run_dir / "final"
    meta = json.loads((final / "mtp.json").read_text())
    cfg = saved_config(meta["config"])
    source = Path(resolve_encoder_path(cfg.encoder.tokenizer or cfg.encoder.name))
    encoder_dir = out / "encoder"
    encoder_dir.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        for name in ENCODER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, encoder_dir / name)
    else:  # a hub name: what transformers has cached
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(source)).save_pretrained(encoder_dir)
        load_tokenizer(cfg.encoder.tokenizer_name).save_pretrained(encoder_dir)
    weights = load_file(str(final / "model.safetensors"))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    (out / "final").mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "final" / "model.safetensors"))
    meta["config"]["encoder"] |= {"name": str(encoder_dir), "tokenizer": None}
    meta["packed_from"] = {"run": run_dir.name, "dtype": str(dtype).removeprefix("torch.")}
    (out / "final" / "mtp.json").write_text(json.dumps(meta, indent=2))
    mib = 2**20
    return {"before_mib": (final / "model.safetensors").stat().st_size / mib,
            "after_mib": (out / "final" / "model.safetensors").stat().st_size / mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    sizes = pack(args.run_dir, args.out, getattr(torch, args.dtype))
    print(f"packed {args.run_dir} into {args.out}: {sizes['before_mib']:.1f} -> {sizes['after_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
