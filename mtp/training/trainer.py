"""The multitask trainer: one DeepSpeed engine, one shared encoder, one head per task; the loop and nothing else.

Runs inside each rank started by the `deepspeed` launcher (`launch.sh`), or in a single process. The loop knows
nothing of pruning, distillation, logging or memory profiling: they plug in through `mtp.hooks.Hook`, built from the
config by `mtp.training.components`; what the run leaves in its folder is `mtp.run_folder`'s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtp.config import ExperimentConfig, cache_dir
from mtp.data import MultitaskSampler, TaskData, load_tasks, task_probabilities, tokenize_task, train_lengths
from mtp.evaluation import collate, evaluate_tasks, to_device
from mtp.hooks import Hook
from mtp.model import MultitaskModel, load_encoder, load_tokenizer, parameter_counts
from mtp.report import print_summary
from mtp.run_folder import CHECKPOINTS, FINAL, final_model_path, initialise_from_run, write_final_meta
from mtp.training import zero_step
from mtp.training.checkpoint import load_checkpoint, save_checkpoint
from mtp.training.components import build_algorithms, build_observers
from mtp.training.distributed import init_distributed, seed_everything, shutdown_distributed
from mtp.training.memory import return_freed_memory_at_once
from mtp.training.optim import (
    adamw,
    build_ds_config,
    lr_schedule,
    precision_of,
    release_gradients_between_steps,
    share_master_weights,
    skip_single_rank_reduction,
    split_param_groups,
    torch_dtype,
    total_steps,
    zero3_layers_as_leaves,
    zero_stage,
)
from mtp.training.state import TrainState
from mtp.zero3 import hf_zero3_build, save_full_state, zero3_init


@dataclass
class Trainer:
    """Everything a step, an evaluation or a checkpoint needs; `Trainer.build` makes one for a config."""

    cfg: ExperimentConfig
    rank: int
    world: int
    tokenizer: Any
    tasks: list[TaskData]
    data: dict[str, dict[str, Any]]
    probs: dict[str, float]
    sampler: MultitaskSampler
    max_steps: int
    ds_config: dict[str, Any]
    param_counts: dict[str, int]
    hooks: list[Hook]
    engine: Any
    optimizer: Any
    state: TrainState
    held_at_build: int = 0  # parameter elements this rank held once the model was built (before the engine)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @classmethod
    def build(cls, cfg: ExperimentConfig, resume: bool = False, hooks: list[Hook] | None = None,
              extra_hooks: list[Hook] | None = None, rank: int = 0, world: int = 1, local_rank: int = 0,
              ds_config: dict[str, Any] | None = None) -> Trainer:
        """Data, model, hooks (`hooks`, else the config's algorithms; then `extra_hooks` and the observers: the memory
        profile and, on rank 0, the loggers), DeepSpeed engine, and the progress of a resumed run. `ds_config`: the
        DeepSpeed config if the caller has built it already."""
        import deepspeed

        ds_config = ds_config if ds_config is not None else build_ds_config(cfg, world)
        observers = build_observers(cfg, ds_config, rank)
        enter_phase(observers, "model_build")
        seed_everything(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
        tasks = load_tasks(cfg)
        data = tokenize_all(cfg, tasks, tokenizer, local_rank)
        sizes = {t.name: len(t.train_texts) for t in tasks}
        probs = task_probabilities(cfg, sizes)
        lengths = ({t.name: train_lengths(data[t.name]["train"]) for t in tasks} if cfg.train.length_buckets
                   else None)
        sampler = MultitaskSampler(sizes, probs, cfg.train.micro_batch_size, rank, world, cfg.train.seed, lengths,
                                   cfg.train.length_buckets)
        max_steps = total_steps(cfg, sizes, world)

        zero3 = zero_stage(ds_config) == 3  # built partitioned from the start (mtp/zero3.py)
        with hf_zero3_build(ds_config, zero3):
            encoder = load_encoder(cfg.encoder.name, cfg.encoder.random_init, cfg.encoder.config_overrides,
                               pad_token_id=tokenizer.pad_token_id)
        with zero3_init(ds_config, zero3):  # the heads too
            model = MultitaskModel(encoder, {t.name: t.num_labels for t in tasks},
                                   pooling=cfg.encoder.pooling, head_dropout=cfg.encoder.head_dropout)
        if cfg.encoder.init_from and not resume:  # on resume the checkpoint holds the weights
            initialise_from_run(model, cfg.encoder.init_from)
        param_counts = parameter_counts(model)
        if hooks is None:
            hooks = build_algorithms(cfg, max_steps, [t.name for t in tasks], torch_dtype(ds_config))
        hooks = [*hooks, *(extra_hooks or []), *observers]
        with zero3_init(ds_config, zero3):  # layers the hooks swap in get partitioned parameters
            for hook in hooks:
                hook.setup(model)
        held_at_build = held_elements(model)
        groups = split_param_groups(model, hooks, cfg.train.weight_decay)
        warmup = int(cfg.train.warmup_ratio * max_steps)
        enter_phase(hooks, "engine_setup")
        zero_step.install()  # ZeRO-1/2's step without its per-parameter extras (same values; mtp/training/zero_step.py)
        zero3_layers_as_leaves(model, ds_config)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            optimizer=None if "optimizer" in ds_config else adamw(groups, cfg),
            lr_scheduler=lambda opt: lr_schedule(opt, warmup, max_steps))
        skip_single_rank_reduction(engine)
        if cfg.train.compile:  # in place: the module keeps its parameter names (checkpoints, exports)
            engine.module.encoder.compile(dynamic=True)
        state = TrainState()
        if resume:
            state = load_checkpoint(engine, Path(cfg.output_dir) / CHECKPOINTS, sampler, hooks, rank)
        share_master_weights(engine)  # after a resume too: a loaded master may be a new tensor
        release_gradients_between_steps(engine)
        return cls(cfg, rank, world, tokenizer, tasks, data, probs, sampler, max_steps, ds_config, param_counts,
                   hooks, engine, optimizer, state, held_at_build)

    # ------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self) -> dict[str, Any]:
        """Dev metrics for every task, each rank scoring its share; all ranks get the same result."""
        self.phase("evaluation")
        self.engine.eval()
        results = evaluate_tasks(self.engine, self.tasks, self.data, self.tokenizer, self.cfg.train.eval_batch_size,
                                 self.engine.device, self.rank, self.world)
        if zero_stage(self.ds_config) == 3:  # parameters prefetched for a forward pass that never came: released
            self.engine.empty_partition_cache()
        self.engine.train()
        self.phase("train")
        return results

    def save_checkpoint(self) -> None:
        self.phase("checkpoint")
        save_checkpoint(self.engine, self.out / CHECKPOINTS, self.state, self.sampler, self.hooks, self.rank,
                        self.cfg.train.keep_checkpoints)
        self.phase("train")

    # ------------------------------------------------------------ training
    def train(self) -> dict[str, Any]:
        """Train to the end (or to train.stop_after_steps), checkpointing and evaluating on the way; returns the
        results (also results.json)."""
        cfg = self.cfg
        names = [t.name for t in self.tasks]
        weights = {t.name: t.weight for t in self.tasks}
        stop_at = min(self.max_steps, cfg.train.stop_after_steps or self.max_steps)
        self.engine.train()
        self.phase("train")
        self.state.started = time.time()
        for hook in self.hooks:
            hook.on_train_start(self.state.step, self.max_steps)
        # loss sums, counts, tokens; on the device, so that no step waits to read its loss and NCCL can reduce it
        window = torch.zeros(2 * len(names) + 1, dtype=torch.float64, device=self.engine.device)
        window_start = time.time()
        while self.state.step < stop_at:
            for _ in range(cfg.train.grad_accum):
                task, rows = self.sampler.next()
                collated = collate(self.data[task]["train"], rows, self.tokenizer)
                tokens = int(collated["attention_mask"].sum())
                batch = to_device(collated, self.engine.device)
                batch["padded"] = tokens < collated["attention_mask"].numel()  # known here, on the host
                out = self.engine(task, **batch)
                loss = out["loss"]
                for hook in self.hooks:
                    loss = hook.batch_loss(task, batch, out, loss)
                loss = loss * weights[task]
                for hook in self.hooks:
                    extra = hook.extra_loss(self.engine.module, self.state.step)
                    if extra is not None:
                        loss = loss + extra
                self.engine.backward(loss)
                self.engine.step()
                t = names.index(task)
                window[t] += out["loss"].detach().double()
                window[len(names) + t] += 1
                window[-1] += tokens
                if self.state.batches_per_task is not None:  # on the host: exact at every checkpoint
                    self.state.batches_per_task[task] = self.state.batches_per_task.get(task, 0) + 1
            self.state.step += 1
            step = self.state.step
            for hook in self.hooks:
                hook.on_optimizer_step(self.engine.module, step)
            if step % cfg.train.log_every == 0 or step == stop_at:
                self._log_window(window, names, time.time() - window_start)
                window.zero_()
                window_start = time.time()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < self.max_steps:
                self._record_eval(self.evaluate())
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < stop_at:
                self.save_checkpoint()
        finished = self.state.step >= self.max_steps
        reports: dict[str, Any] = {}  # what the hooks add to results.json (a pruning method: "pruning")
        if finished:
            for hook in self.hooks:
                reports.update(hook.on_train_end(self.engine.module) or {})
            self._record_eval(self.evaluate())
            self.save_final_model(reports.get("pruning"))
        self.save_checkpoint()
        results = self.results(finished, reports)
        for hook in self.hooks:
            hook.on_results(results)
        return results

    def save_final_model(self, pruning_report: dict[str, Any] | None) -> None:
        """final/model.safetensors (every parameter and buffer: masks, gates) and final/mtp.json, for export."""
        self.phase("final_save")
        if self.rank == 0:
            (self.out / FINAL).mkdir(parents=True, exist_ok=True)
        # collective under ZeRO-3 (every rank takes part in the gathers); one parameter held at a time
        save_full_state(self.engine.module, final_model_path(self.out), write=self.rank == 0)
        if self.rank == 0:
            write_final_meta(self.out, self.cfg, self.state.step,
                             [{"name": t.name, "labels": t.labels, "metric": t.metric} for t in self.tasks],
                             pruning_report, {k: v["score"] for k, v in self.state.last_eval.items()})

    def phase(self, name: str) -> None:
        """Tell the hooks the phase the trainer enters (the memory profile listens)."""
        enter_phase(self.hooks, name)

    def _log_window(self, window: torch.Tensor, names: list[str], seconds: float) -> None:
        """Reduce the window's losses and counts over the ranks and hand every scalar of the step to the hooks."""
        window = window.clone()
        dist.all_reduce(window)  # a device tensor: NCCL reduces no CPU tensors (gloo takes both)
        window = window.cpu()
        n = len(names)
        tokens = int(window[-1])
        self.state.tokens_seen += tokens
        counts = window[n:2 * n] / self.world  # every rank counted the same micro-steps
        steps_in_window = max(1.0, float(counts.sum()))
        mean_loss = float(window[:n].sum() / self.world / steps_in_window)
        check_finite_loss(self.state.step, mean_loss, {name: float(window[i]) for i, name in enumerate(names)})
        self.state.loss_history.append({"step": self.state.step, "loss": mean_loss})
        scalars: dict[str, float] = {"train/loss": mean_loss}
        for i, name in enumerate(names):
            if counts[i] > 0:
                scalars[f"train/loss/{name}"] = float(window[i] / self.world / counts[i])
            scalars[f"train/task_share/{name}"] = float(counts[i] / steps_in_window)
            scalars[f"train/batches/{name}"] = float(counts[i])
        for group in self.optimizer.param_groups:
            scalars[f"train/lr/{group.get('name', 'group')}"] = group["lr"]
        scalars["train/tokens_per_s"] = tokens / max(seconds, 1e-9)
        scalars["train/tokens_seen"] = self.state.tokens_seen
        # every rank asks the hooks: their metrics may gather ZeRO-3 partitions (a collective)
        for hook in self.hooks:
            scalars.update(hook.metrics())
        for hook in self.hooks:
            hook.on_log(self.state.step, scalars)

    def _record_eval(self, results: dict[str, Any]) -> None:
        mean = float(np.mean([r["score"] for r in results.values()]))
        self.state.eval_history.append({"step": self.state.step, "mean_score": mean,
                                        "scores": {k: v["score"] for k, v in results.items()}})
        self.state.last_eval = results
        for hook in self.hooks:
            hook.on_evaluate(self.state.step, results)

    def results(self, finished: bool, reports: dict[str, Any]) -> dict[str, Any]:
        """What results.json holds."""
        state = self.state
        results: dict[str, Any] = {
            "finished": finished, "steps": state.step, "max_steps": self.max_steps,
            "tokens_seen": state.tokens_seen, "wall_time_s": round(state.wall_time, 2), "world_size": self.world,
            "precision": precision_of(self.ds_config), "zero_stage": zero_stage(self.ds_config),
            "params": self.param_counts, "sampling": self.probs, "batches_per_task": state.batches_per_task,
            "data": {t.name: {"source": t.source, **t.stats} for t in self.tasks},
            "eval_history": state.eval_history, "loss_history": state.loss_history,
        }
        if finished:
            results["tasks"] = state.last_eval
            results["mean_score"] = float(np.mean([r["score"] for r in state.last_eval.values()]))
        if zero_stage(self.ds_config) == 3:
            results["zero3_parameters"] = self.partition_report()
        results.update(reports)
        return results

    def partition_report(self) -> dict[str, Any]:
        """Under ZeRO-3: the parameter elements of the model and how many each rank holds, once built (before the
        engine) and at the end (a collective)."""
        module = self.engine.module
        total = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
        per_rank: list[Any] = [None] * self.world
        dist.all_gather_object(per_rank, (self.held_at_build, held_elements(module)))
        return {"total": total, "held_at_build_per_rank": [b for b, _ in per_rank],
                "held_per_rank": [e for _, e in per_rank],
                "largest_share": max(max(b, e) for b, e in per_rank) / total}


class LossNotFinite(RuntimeError):
    """The training loss became inf or NaN (the last checkpoint is kept; resume from it with other settings)."""


def check_finite_loss(step: int, mean_loss: float, task_loss_sums: dict[str, float]) -> None:
    """Stop the run in one line, naming the tasks, once a log step's loss is not finite (no step skips a
    non-finite loss by default: bf16 runs train without DeepSpeed's overflow check, see build_ds_config)."""
    if np.isfinite(mean_loss):
        return
    bad = [name for name, value in task_loss_sums.items() if not np.isfinite(value)]
    raise LossNotFinite(f"step {step}: the training loss is {mean_loss} (tasks: {', '.join(bad) or 'none'}); the "
                        "last checkpoint is kept. Lower train.lr or, in bf16, set bf16.check_grad_overflow: true "
                        "in the DeepSpeed config to skip such steps")


def enter_phase(hooks: list[Hook], name: str) -> None:
    for hook in hooks:
        hook.on_phase(name)


def held_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its partitions of ZeRO-3 parameters, the whole of the others."""
    return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def tokenize_all(cfg: ExperimentConfig, tasks: list[TaskData], tokenizer: Any, local_rank: int,
                 ) -> dict[str, dict[str, Any]]:
    """Local rank 0 tokenizes (and fills the cache) first; the other ranks then read the cache."""
    cache = cache_dir(cfg) / "tokenized"
    tok_id = f"{cfg.encoder.tokenizer or cfg.encoder.name}:{type(tokenizer).__name__}"
    result: dict[str, dict[str, Any]] = {}
    for turn in (0, 1):
        if (local_rank == 0) == (turn == 0):
            result = {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache, tok_id) for t in tasks}
        dist.barrier()
    return result


def run_training(cfg: ExperimentConfig, resume: bool = False, extra_hooks: list[Hook] | None = None,
                 ) -> dict[str, Any]:
    """Train (or resume) the experiment in this process as one rank of the job; returns results.json."""
    from deepspeed.accelerator import get_accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher
    ds_config = build_ds_config(cfg, world_size)
    if get_accelerator().device_name() == "cpu" and zero_stage(ds_config) == 3:
        return_freed_memory_at_once()  # before the process group's threads make their heaps
    rank, world, local_rank = init_distributed()
    trainer = Trainer.build(cfg, resume=resume, extra_hooks=list(extra_hooks or []), rank=rank, world=world,
                            local_rank=local_rank, ds_config=ds_config if world == world_size else None)
    results = trainer.train()
    if rank == 0:
        print_summary(results, cfg)
    shutdown_distributed()
    return results
