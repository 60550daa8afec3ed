"""Knowledge distillation from a dense teacher, as a hook: an option of every pruning method and of dense training.

The teacher is a finished mtp run (encoder and task heads, pruning folded in) or a Hugging Face encoder. For
each micro-batch it runs on the same inputs, without gradients, and the loss becomes

    task_weight * L_task + logit_weight * L_logit + hidden_weight * L_hidden

where L_logit is KL(teacher || student) of the task's logits at temperature T, times T^2 (Hinton et al.; Sanh
et al. distil their pruned models this way), or the squared error for a regression task, and L_hidden is the mean
squared error between the outputs of block i of student and teacher over real tokens, averaged over the blocks
(CoFi's layer distillation with the identity layer map: pruning keeps every block and the hidden size).
A multitask model can also take each task's logits from a teacher of its own (distill.task_teachers, as MT-DNN
distils per-task teachers into one model): for example each task's single-task dense run, which may be better on
its task than the dense multitask model; block outputs still come from the one shared teacher.
Teachers are ordinary modules on every rank, outside the DeepSpeed engine, so they work under ZeRO 0-3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp.config import ConfigError, DistillConfig
from mtp.hooks import Hook
from mtp.model import encoder_mask, from_pretrained_quietly, load_hf_config, resolve_encoder_path
from mtp.run_folder import has_final_model, load_finished_run, require_finished_run, run_tasks


class HiddenStateTeacher(nn.Module):
    """A Hugging Face encoder as a teacher: block outputs only (it has no task heads)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, padded: bool | None = None) -> dict[str, Any]:
        kwargs = {"input_ids": input_ids, "attention_mask": encoder_mask(attention_mask, padded)}
        if token_type_ids is not None and getattr(self.encoder.config, "type_vocab_size", 1) > 1:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs, output_hidden_states=True)
        return {"hidden_states": tuple(out.hidden_states[1:])}


def check_teachers(cfg: DistillConfig, tasks: list[str]) -> None:
    """That distill.teacher and distill.task_teachers can give what the weights ask of them, from their folders alone
    (no weights are loaded): each task teacher a finished run with a head for its task; the shared teacher a finished
    run with a head for every task that has no teacher of its own (when logits are distilled), or a Hugging Face
    encoder when only block outputs are. Every refusal is one line naming the key (the pre-flight check and the
    hook both call this)."""
    for task, folder in cfg.task_teachers.items():
        key = f"distill.task_teachers.{task}"
        if task not in tasks:
            raise ConfigError(f"{key}: {task!r} is not one of the tasks {tasks}")
        require_finished_run(folder, key, [task], why=", so it has no task head")
    if cfg.teacher is None:
        return
    shared = [t for t in tasks if t not in cfg.task_teachers]  # the shared teacher gives logits for these only
    found = run_tasks(cfg.teacher, "distill.teacher")
    if found is None:
        if cfg.logit_weight > 0 and shared:
            raise ConfigError(f"distill.teacher: {cfg.teacher} is not a finished mtp run, so it has no task heads; "
                              "set distill.logit_weight=0 to distil hidden states only")
        try:
            load_hf_config(cfg.teacher)
        except ConfigError as err:
            raise ConfigError(f"distill.teacher: {str(err).partition(': ')[2]}") from None
    elif cfg.logit_weight > 0 and any(t not in found for t in shared):
        missing = next(t for t in shared if t not in found)
        raise ConfigError(f"distill.teacher: {cfg.teacher} has no head for task {missing!r} "
                          "(set distill.logit_weight=0 to distil hidden states only)")


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_task_teachers(cfg: DistillConfig, tasks: list[str],
                       loaded: dict[Path, nn.Module] | None = None) -> dict[str, nn.Module]:
    """The per-task logit teachers of distill.task_teachers, frozen, one module per distinct run folder (`loaded`:
    modules already in memory, by resolved folder); `check_teachers` has refused what cannot serve."""
    loaded = {} if loaded is None else loaded
    teachers: dict[str, nn.Module] = {}
    for task, folder in cfg.task_teachers.items():
        where = Path(folder).resolve()
        if where not in loaded:
            loaded[where] = _frozen(load_finished_run(folder, f"distill.task_teachers.{task}")[0])
        teachers[task] = loaded[where]
    return teachers


def load_teacher(cfg: DistillConfig) -> nn.Module:
    """The teacher named by distill.teacher (a finished run, or a Hugging Face encoder for block outputs), in
    evaluation mode without gradients; `check_teachers` has refused what cannot serve."""
    assert cfg.teacher is not None
    if has_final_model(cfg.teacher):
        return _frozen(load_finished_run(cfg.teacher, "distill.teacher")[0])
    from transformers import AutoModel

    try:
        encoder = from_pretrained_quietly(AutoModel, resolve_encoder_path(cfg.teacher), "distill.teacher",
                                          add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"distill.teacher: cannot load {cfg.teacher!r}: {str(err).splitlines()[0]}") from None
    return _frozen(HiddenStateTeacher(encoder))


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) T^2 per example for classification; squared error for regression."""
    if student.shape[-1] == 1:
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of the squared error per real token and feature."""
    if len(student) != len(teacher):
        raise ValueError(f"distill: the student has {len(student)} blocks, the teacher {len(teacher)}")
    mask = attention_mask.unsqueeze(-1).float()
    count = mask.sum() * student[0].shape[-1]
    total = sum(((s.float() - t.float()) ** 2 * mask).sum() / count for s, t in zip(student, teacher, strict=True))
    return total / len(student)


class Distillation(Hook):
    """The distillation hook: loads the teacher, asks the student for block outputs, rewrites each loss."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, tasks: list[str], dtype: torch.dtype = torch.float32,
                 teacher: nn.Module | None = None, task_teachers: dict[str, nn.Module] | None = None):
        """`teacher` and `task_teachers` (models in evaluation mode) stand in for the ones distill.teacher and
        distill.task_teachers name (benchmarks)."""
        self.cfg = cfg
        if teacher is None or task_teachers is None:
            check_teachers(cfg, tasks)
        needs_shared = cfg.hidden_weight > 0 or any(t not in cfg.task_teachers for t in tasks)
        if teacher is None and cfg.teacher is not None and needs_shared:
            teacher = load_teacher(cfg)
        self.teacher = None if teacher is None else teacher.to(dtype)
        if task_teachers is None:
            shared = {} if self.teacher is None or cfg.teacher is None else {Path(cfg.teacher).resolve(): self.teacher}
            task_teachers = load_task_teachers(cfg, tasks, shared)
        self.task_teachers = {task: t.to(dtype) for task, t in task_teachers.items()}
        if self.teacher is not None and not isinstance(self.teacher, HiddenStateTeacher):
            self.teacher.keep_hidden_states = cfg.hidden_weight > 0  # after: a task teacher may be this module
        self.last: dict[str, torch.Tensor] = {}

    def _teachers(self) -> list[nn.Module]:
        return [t for t in (self.teacher, *self.task_teachers.values()) if t is not None]

    def setup(self, model: nn.Module) -> None:
        if self.cfg.logit_weight > 0:  # a head of another width would be broadcast against, not refused
            for task, width in model.outputs.items():
                source = self.task_teachers.get(task, self.teacher)
                theirs = getattr(source, "outputs", {}).get(task, width)
                if theirs != width:
                    key = f"distill.task_teachers.{task}" if task in self.task_teachers else "distill.teacher"
                    raise ConfigError(f"{key}: its head for task {task!r} has {theirs} outputs, the student's {width}")
        if self.cfg.hidden_weight > 0:
            assert self.teacher is not None  # DistillConfig refuses hidden_weight without a shared teacher
            model.keep_hidden_states = True
            width = self.teacher.encoder.config.hidden_size
            if width != model.encoder.config.hidden_size:
                raise ConfigError(f"distill.teacher: hidden size {width} differs from the student's "
                                  f"{model.encoder.config.hidden_size}; hidden-state distillation needs the same")

    def batch_loss(self, task: str, batch: dict[str, torch.Tensor], outputs: dict[str, Any],
                   loss: torch.Tensor) -> torch.Tensor:
        device = batch["input_ids"].device
        for teacher in self._teachers():
            if next(teacher.parameters()).device != device:
                teacher.to(device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        own = self.task_teachers.get(task)
        target: dict[str, Any] = {}
        with torch.no_grad():
            if own is None:
                target = self.teacher(task, **inputs)  # logits and block outputs in one pass
            else:
                if self.cfg.hidden_weight > 0:  # block outputs alone: the shared teacher may lack this task's head
                    target = {"hidden_states": self._block_outputs(task, inputs)}
                target["logits"] = own(task, **inputs)["logits"]
        total = self.cfg.task_weight * loss
        self.last = {"task": loss.detach()}
        if self.cfg.logit_weight > 0:
            term = logit_loss(outputs["logits"], target["logits"], self.cfg.temperature)
            total = total + self.cfg.logit_weight * term
            self.last["logit"] = term.detach()
        if self.cfg.hidden_weight > 0:
            term = hidden_loss(outputs["hidden_states"], target["hidden_states"], batch["attention_mask"])
            total = total + self.cfg.hidden_weight * term
            self.last["hidden"] = term.detach()
        return total

    def _block_outputs(self, task: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if isinstance(self.teacher, HiddenStateTeacher):
            return self.teacher(task, **inputs)["hidden_states"]
        return self.teacher.encode(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"),
                                   inputs.get("padded"))[1]

    def metrics(self) -> dict[str, float]:
        return {f"distill/{k}_loss": float(v) for k, v in self.last.items()}


def build_distillation(cfg: DistillConfig, tasks: list[str], dtype: torch.dtype) -> list[Hook]:
    """The distillation hook when distill.teacher or distill.task_teachers is set (none otherwise)."""
    return [Distillation(cfg, tasks, dtype)] if cfg.enabled else []
