"""The multitask trainer: one DeepSpeed engine, one shared encoder, one head per task.

Runs inside each rank started by the `deepspeed` launcher (`launch.sh`), or in a single process.
The loop knows nothing of pruning: algorithms plug in through `mtp.hooks.Hook`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtp.config import ConfigError, ExperimentConfig, cache_dir, dump_config, resolve_path
from mtp.data import MultitaskSampler, TaskData, eval_shard, load_tasks, task_probabilities, tokenize_task
from mtp.distill import build_distillation
from mtp.export import initialise_from_run
from mtp.hooks import Hook
from mtp.metrics import compute_metrics, task_score
from mtp.model import MultitaskModel, TaskInfo, full_state_dict, load_encoder, load_tokenizer, parameter_counts
from mtp.pruning import build_pruning

CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------- DeepSpeed config


def build_ds_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """Read the DeepSpeed JSON named by train.deepspeed_config and fill its "auto" values from the YAML.

    Batch size, accumulation, clipping, learning rate and weight decay come from the YAML (one source
    of truth); a concrete value in the JSON that disagrees is an error. The LR schedule is mtp's own
    (warmup + linear decay, per parameter group), so a "scheduler" block is refused.
    """
    path = resolve_path(cfg.train.deepspeed_config, "train.deepspeed_config")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: 'scheduler' is set by mtp from train.warmup_ratio; remove it")
    t = cfg.train
    wanted = {
        ("train_micro_batch_size_per_gpu",): t.micro_batch_size,
        ("gradient_accumulation_steps",): t.grad_accum,
        ("train_batch_size",): t.micro_batch_size * t.grad_accum * world_size,
        ("gradient_clipping",): t.grad_clip,
    }
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {})
        wanted[("optimizer", "params", "lr")] = t.lr
        wanted[("optimizer", "params", "weight_decay")] = t.weight_decay
    for keys, value in wanted.items():
        node = ds
        for key in keys[:-1]:
            node = node[key]
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            yaml_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                        "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.grad_clip",
                        "lr": "train.lr", "weight_decay": "train.weight_decay",
                        "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks"}[keys[-1]]
            raise ConfigError(f"{path}: {'.'.join(keys)}={current} disagrees with {yaml_key}={value}; "
                              "set it to \"auto\"")
        node[keys[-1]] = value
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def torch_dtype(ds: dict[str, Any]) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_of(ds)]


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------- helpers


def init_distributed() -> tuple[int, int, int]:
    """Start (or join) the process group. A lone process without a launcher gets world size 1."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 20000)
    # joins a process group someone else started (Ray Train) as well as starting one
    deepspeed.init_distributed(dist_init_required=not dist.is_initialized(), auto_mpi_discovery=False)
    atexit.register(_remove_shm_buffer, dist.get_rank())
    # the deepspeed launcher stops its ranks with SIGTERM, which would skip atexit (and leave the buffer behind)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


_termination = {"deferred": False, "requested": False}


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """Turn SIGTERM into SystemExit, so that atexit handlers run; while a checkpoint is written, after it."""
    if _termination["deferred"]:
        _termination["requested"] = True
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's own SIGTERM follows: let the cleanup finish
    raise SystemExit(128 + signum)


@contextmanager
def _terminate_after() -> Any:
    """Hold a SIGTERM until the block (a checkpoint) is complete, so that `latest` never names a partial one."""
    _termination["deferred"] = True
    try:
        yield
    finally:
        _termination["deferred"] = False
        if _termination["requested"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise SystemExit(128 + signal.SIGTERM)


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (about 66 MB) and never removes it: without this, every run leaves it behind until RAM runs out."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(cfg: ExperimentConfig, sizes: dict[str, int], world: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    return max(1, math.ceil(cfg.train.epochs * sum(sizes.values()) / per_step))


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _constant(_step: int) -> float:
    return 1.0


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then linear decay for every group, except groups marked `constant_lr` (gates: FLOP and CoFi train
    them at a constant rate)."""
    decay = lr_lambda(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_constant if g.get("constant_lr") else decay for g in optimizer.param_groups])


def split_param_groups(model: torch.nn.Module, hooks: list[Hook], weight_decay: float) -> list[dict[str, Any]]:
    """Default AdamW groups (no decay on biases and LayerNorms) plus the hooks' own groups."""
    hook_groups = [g for h in hooks for g in h.param_groups(model)]
    taken = {id(p) for g in hook_groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups + hook_groups if g["params"]]


def collate(split: Any, rows: list[int] | np.ndarray, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Dynamic padding of the given rows of a tokenized split."""
    batch = split[[int(i) for i in rows]]
    labels = torch.tensor(batch.pop("labels"))
    features = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    padded = tokenizer.pad(features, return_tensors="pt")
    padded["labels"] = labels
    return dict(padded)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_tasks(forward: Any, tasks: list[TaskData], data: dict[str, dict[str, Any]], tokenizer: Any,
                   batch_size: int, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                   ) -> dict[str, Any]:
    """Dev metrics of `forward(task, **batch)` on every task; with world > 1 each rank scores its share."""
    results: dict[str, Any] = {}
    for task in tasks:
        splits = {}
        for split in task.dev:
            ds = data[task.name][f"dev_{split}"]
            lengths = [len(x) for x in ds["input_ids"]]
            local_idx: list[int] = []
            local_pred: list[float] = []
            for rows in eval_shard(lengths, batch_size, rank, world):
                batch = _to_device(collate(ds, rows, tokenizer), torch.device(device))
                batch.pop("labels")
                logits = forward(task.name, **batch)["logits"]
                pred = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
                local_idx += rows
                local_pred += pred.float().cpu().tolist()
            gathered: list[Any] = [(local_idx, local_pred)]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, (local_idx, local_pred))
            preds = np.zeros(len(lengths))
            for idx, pred in gathered:
                preds[idx] = pred
            splits[split] = compute_metrics(task.metric, preds, np.array(ds["labels"]))
        results[task.name] = {"dev": splits, "score": task_score(splits)}
    return results


# ---------------------------------------------------------------- the trainer


@dataclass
class Trainer:
    """Holds the engine and everything a step, an eval or a checkpoint needs."""

    cfg: ExperimentConfig
    hooks: list[Hook] | None = None  # None: the pruning hooks the config asks for
    extra_hooks: list[Hook] = field(default_factory=list)  # added to those (reporting, logging)
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.output_dir)
        self.ckpt_dir = self.out / CHECKPOINTS

    # ------------------------------------------------------------ setup
    def setup(self, resume: bool) -> None:
        import deepspeed

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.encoder)
        self.tasks: list[TaskData] = load_tasks(cfg)
        self.data = self._tokenize_all()
        sizes = {t.name: len(t.train_texts) for t in self.tasks}
        self.probs = task_probabilities(cfg, sizes)
        self.sampler = MultitaskSampler(sizes, self.probs, cfg.train.micro_batch_size, self.rank, self.world,
                                        cfg.train.seed)
        self.max_steps = total_steps(cfg, sizes, self.world)
        self.ds_config = build_ds_config(cfg, self.world)

        encoder = load_encoder(cfg.encoder, pad_token_id=self.tokenizer.pad_token_id)
        model = MultitaskModel(encoder, [TaskInfo(t.name, t.num_labels) for t in self.tasks],
                               pooling=cfg.encoder.pooling, head_dropout=cfg.encoder.head_dropout)
        if cfg.encoder.init_from and not resume:  # on resume the checkpoint holds the weights
            initialise_from_run(model, cfg.encoder.init_from)
        self.param_counts = parameter_counts(model)
        if self.hooks is None:
            self.hooks = [*build_pruning(cfg.pruning, self.max_steps),
                          *build_distillation(cfg.distill, [t.name for t in self.tasks], torch_dtype(self.ds_config))]
        self.hooks = [*self.hooks, *self.extra_hooks]
        for hook in self.hooks:
            hook.setup(model)
        groups = split_param_groups(model, self.hooks, cfg.train.weight_decay)
        warmup = int(cfg.train.warmup_ratio * self.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config,
            optimizer=None if "optimizer" in self.ds_config else _adamw(groups, cfg),
            lr_scheduler=lambda opt: lr_schedule(opt, warmup, self.max_steps))
        skip_single_rank_reduction(self.engine)
        self.device = self.engine.device
        self.step = 0
        self.tokens_seen = 0
        self.prior_wall = 0.0
        self.eval_history: list[dict[str, Any]] = []
        self.loss_history: list[dict[str, Any]] = []
        if resume:
            self._load_checkpoint()
        self.writer = self._tensorboard()

    def _tokenize_all(self) -> dict[str, dict[str, Any]]:
        """Local rank 0 tokenizes (and fills the cache) first; the other ranks then read the cache."""
        cache = cache_dir(self.cfg) / "tokenized"
        tok_id = f"{self.cfg.encoder.tokenizer or self.cfg.encoder.name}:{type(self.tokenizer).__name__}"
        result: dict[str, dict[str, Any]] = {}
        for turn in (0, 1):
            if (self.local_rank == 0) == (turn == 0):
                result = {t.name: tokenize_task(t, self.tokenizer, self.cfg.data.max_seq_len, cache, tok_id)
                          for t in self.tasks}
            dist.barrier()
        return result

    def _tensorboard(self) -> Any:
        if self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)
        if self.step == 0:
            writer.add_text("config", "```yaml\n" + dump_config(self.cfg) + "\n```")
            writer.add_text("deepspeed_config", "```json\n" + json.dumps(self.ds_config, indent=2) + "\n```")
        return writer

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        with _terminate_after():
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        tag = f"step_{self.step}"
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                 "wall_time": self.prior_wall + time.time() - self.t_start, "eval_history": self.eval_history,
                 "loss_history": self.loss_history,
                 "hooks": {h.name: h.state_dict() for h in self.hooks}}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"mtp": state})
        _save_rng(self.ckpt_dir / tag / f"rng_rank{self.rank}.safetensors")
        dist.barrier()
        if self.rank == 0:
            tags = sorted((p for p in self.ckpt_dir.glob("step_*") if p.is_dir()),
                          key=lambda p: int(p.name.split("_")[1]))
            for old in tags[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _load_checkpoint(self) -> None:
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {self.ckpt_dir}")
        state = client["mtp"]
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.prior_wall = state["wall_time"]
        self.eval_history = state["eval_history"]
        self.loss_history = state["loss_history"]
        self.sampler.load_state_dict(state["sampler"])
        for hook in self.hooks:
            hook.load_state_dict(state["hooks"].get(hook.name, {}))
        rng_file = Path(path).parent / f"rng_rank{self.rank}.safetensors"
        if not rng_file.exists():  # DeepSpeed returns the model-states file path
            rng_file = Path(path) / f"rng_rank{self.rank}.safetensors"
        _load_rng(rng_file)

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Dev metrics for every task, each rank scoring its share; all ranks get the same result."""
        self.engine.eval()
        results = evaluate_tasks(self.engine, self.tasks, self.data, self.tokenizer, self.cfg.train.eval_batch_size,
                                 self.device, self.rank, self.world)
        self.engine.train()
        return results

    # ------------------------------------------------------------ training
    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        names = [t.name for t in self.tasks]
        weights = {t.name: t.weight for t in self.tasks}
        stop_at = min(self.max_steps, cfg.train.stop_after_steps or self.max_steps)
        self.engine.train()
        self.t_start = time.time()
        # loss sums, counts, tokens; on the device, so that no step waits to read its loss and NCCL can reduce it
        window = torch.zeros(2 * len(names) + 1, dtype=torch.float64, device=self.device)
        window_start = time.time()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True,
                   desc="train", unit="step")
        if self.rank == 0 and cfg.train.stop_after_steps and stop_at < self.max_steps:
            bar.write(f"stopping after step {stop_at} of {self.max_steps} (train.stop_after_steps)")
        while self.step < stop_at:
            for _ in range(cfg.train.grad_accum):
                task, rows = self.sampler.next()
                collated = collate(self.data[task]["train"], rows, self.tokenizer)
                tokens = int(collated["attention_mask"].sum())
                batch = _to_device(collated, self.device)
                out = self.engine(task, **batch)
                loss = out["loss"]
                for hook in self.hooks:
                    loss = hook.batch_loss(task, batch, out, loss)
                loss = loss * weights[task]
                for hook in self.hooks:
                    extra = hook.extra_loss(self.engine.module, self.step)
                    if extra is not None:
                        loss = loss + extra
                self.engine.backward(loss)
                self.engine.step()
                t = names.index(task)
                window[t] += out["loss"].detach().double()
                window[len(names) + t] += 1
                window[-1] += tokens
            self.step += 1
            for hook in self.hooks:
                hook.on_optimizer_step(self.engine.module, self.step)
            if self.step % cfg.train.log_every == 0 or self.step == stop_at:
                self._log_window(window, names, time.time() - window_start, bar)
                window.zero_()
                window_start = time.time()
            bar.update(1)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.max_steps:
                self._record_eval(self.evaluate())
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and self.step < stop_at:
                self.save_checkpoint()
        bar.close()
        finished = self.step >= self.max_steps
        hook_report: dict[str, Any] = {}
        if finished:
            for hook in self.hooks:
                report = hook.on_train_end(self.engine.module)
                if report:
                    hook_report[hook.name] = report
            self._record_eval(self.evaluate())
            self.save_final_model(hook_report)
        self.save_checkpoint()
        return self._write_results(finished, hook_report)

    def save_final_model(self, hook_report: dict[str, Any]) -> None:
        """final/model.safetensors (every parameter and buffer: masks, gates) and final/mtp.json, for export."""
        from safetensors.torch import save_file

        state = full_state_dict(self.engine.module)  # collective under ZeRO-3: every rank takes part
        if self.rank != 0:
            return
        final = self.out / "final"
        final.mkdir(parents=True, exist_ok=True)
        save_file(state, str(final / "model.safetensors"))
        meta = {"config": self.cfg.model_dump(mode="json"), "steps": self.step,
                "tasks": [{"name": t.name, "labels": t.labels, "metric": t.metric} for t in self.tasks],
                "pruning": hook_report.get("pruning"), "dev_scores": {k: v["score"] for k, v in self.last_eval.items()}}
        (final / "mtp.json").write_text(json.dumps(meta, indent=2))

    def _log_window(self, window: torch.Tensor, names: list[str], seconds: float, bar: Any) -> None:
        window = window.clone()
        dist.all_reduce(window)  # a device tensor: NCCL reduces no CPU tensors (gloo takes both)
        window = window.cpu()
        n = len(names)
        tokens = int(window[-1])
        self.tokens_seen += tokens
        counts = window[n:2 * n] / self.world  # every rank counted the same micro-steps
        steps_in_window = max(1.0, float(counts.sum()))
        mean_loss = float(window[:n].sum() / self.world / steps_in_window)
        self.loss_history.append({"step": self.step, "loss": mean_loss})
        # every rank asks the hooks: their metrics may gather ZeRO-3 partitions (a collective)
        hook_metrics = {tag: value for hook in self.hooks for tag, value in hook.metrics().items()}
        if self.rank != 0:
            return
        for i, name in enumerate(names):
            if counts[i] > 0:
                self.writer.add_scalar(f"train/loss/{name}", float(window[i] / self.world / counts[i]), self.step)
            self.writer.add_scalar(f"train/task_share/{name}", float(counts[i] / steps_in_window), self.step)
        for group in self.optimizer.param_groups:
            self.writer.add_scalar(f"train/lr/{group.get('name', 'group')}", group["lr"], self.step)
        tok_s = tokens / max(seconds, 1e-9)
        self.writer.add_scalar("train/tokens_per_s", tok_s, self.step)
        self.writer.add_scalar("train/tokens_seen", self.tokens_seen, self.step)
        for tag, value in hook_metrics.items():
            self.writer.add_scalar(tag, value, self.step)
        mix = " ".join(f"{name}:{int(counts[i])}" for i, name in enumerate(names))
        bar.set_postfix_str(f"loss={mean_loss:.3f} tok/s={tok_s:.0f} mix[{mix}]", refresh=False)

    def _record_eval(self, results: dict[str, Any]) -> None:
        mean = float(np.mean([r["score"] for r in results.values()]))
        self.eval_history.append({"step": self.step, "mean_score": mean,
                                  "scores": {k: v["score"] for k, v in results.items()}})
        self.last_eval = results
        for hook in self.hooks:
            hook.on_evaluate(self.step, results)
        if self.rank == 0:
            for name, res in results.items():
                for split, metrics in res["dev"].items():
                    for key, value in metrics.items():
                        self.writer.add_scalar(f"dev/{name}/{split}/{key}", value, self.step)
            self.writer.add_scalar("dev/mean_score", mean, self.step)
            self.writer.flush()

    def _write_results(self, finished: bool, hook_report: dict[str, Any]) -> dict[str, Any]:
        wall = self.prior_wall + time.time() - self.t_start
        results: dict[str, Any] = {
            "finished": finished, "steps": self.step, "max_steps": self.max_steps,
            "tokens_seen": self.tokens_seen, "wall_time_s": round(wall, 2), "world_size": self.world,
            "precision": precision_of(self.ds_config), "zero_stage": zero_stage(self.ds_config),
            "params": self.param_counts, "sampling": self.probs,
            "data": {t.name: {"source": t.source, **t.stats} for t in self.tasks},
            "eval_history": self.eval_history, "loss_history": self.loss_history,
        }
        if finished:
            results["tasks"] = self.last_eval
            results["mean_score"] = float(np.mean([r["score"] for r in self.last_eval.values()]))
        results.update(hook_report)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
            self.writer.close()
        return results


def skip_single_rank_reduction(engine: Any) -> None:
    """On one rank without ZeRO there is nothing to reduce, yet DeepSpeed's stage-0 path still flattens and
    copies back every gradient after each backward pass (about 7% of a MiniLM step on CPU): switch it off."""
    if engine.zero_optimization_stage() == 0 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False


def _adamw(groups: list[dict[str, Any]], cfg: ExperimentConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path))


def _load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        return
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def run_training(cfg: ExperimentConfig, resume: bool = False, extra_hooks: list[Hook] | None = None,
                 ) -> dict[str, Any]:
    """Train (or resume) the experiment in this process as one rank of the job; returns results.json."""
    rank, world, local_rank = init_distributed()
    trainer = Trainer(cfg, extra_hooks=list(extra_hooks or []), rank=rank, world=world, local_rank=local_rank)
    trainer.setup(resume=resume)
    results = trainer.train()
    if rank == 0:
        from mtp.report import print_summary

        print_summary(results, cfg)
    return results
