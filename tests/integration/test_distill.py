"""Distillation and starting from a finished run: losses against references, the hook against an identical
teacher, init_from, fixed masks and ranks for the final fine-tuning, and fingerprints of unchanged recipes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import log_softmax, softmax

from mtp.config import ConfigError, DistillConfig, EncoderConfig, ExperimentConfig
from mtp.distill import Distillation, hidden_loss, logit_loss
from mtp.model import MultitaskModel, load_encoder
from mtp.pruning import build_pruning, pruning_settings
from mtp.run_folder import initialise_from_run
from mtp.zero3 import full_state_dict
from tests.conftest import ROOT


def tiny_model(seed: int = 0, tasks: tuple[tuple[str, int], ...] = (("rte", 2), ("stsb", 1))) -> MultitaskModel:
    torch.manual_seed(seed)
    encoder = load_encoder("configs/arch/tiny-bert", random_init=True)
    return MultitaskModel(encoder, dict(tasks))


def save_as_finished_run(model: MultitaskModel, run_dir: Path, labels: dict[str, list[str] | None]) -> Path:
    """The files a finished run leaves (final/model.safetensors, final/mtp.json), for a model built here."""
    cfg = ExperimentConfig(encoder=EncoderConfig(name="configs/arch/tiny-bert", random_init=True),
                           tasks=[{"name": t} for t in model.tasks])
    (run_dir / "final").mkdir(parents=True)
    save_file(full_state_dict(model), str(run_dir / "final" / "model.safetensors"))
    meta = {"config": cfg.model_dump(mode="json"), "steps": 1, "pruning": None, "dev_scores": {},
            "tasks": [{"name": t, "labels": labels[t], "metric": "accuracy"} for t in model.tasks]}
    (run_dir / "final" / "mtp.json").write_text(json.dumps(meta))
    return run_dir


def test_logit_loss_matches_the_kl_divergence_and_squared_error() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    temperature = 2.0
    p = softmax(t / temperature, axis=1)
    reference = (p * (np.log(p) - log_softmax(s / temperature, axis=1))).sum(1).mean() * temperature**2
    got = logit_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert abs(float(got) - reference) < 1e-6
    assert float(logit_loss(torch.tensor(t), torch.tensor(t), temperature)) == pytest.approx(0.0, abs=1e-7)
    r_s, r_t = rng.normal(size=(5, 1)), rng.normal(size=(5, 1))
    assert float(logit_loss(torch.tensor(r_s), torch.tensor(r_t), temperature)) == pytest.approx(
        float(((r_s - r_t) ** 2).mean()))


def test_hidden_loss_counts_real_tokens_only() -> None:
    torch.manual_seed(0)
    student = tuple(torch.randn(2, 4, 3) for _ in range(2))
    teacher = tuple(torch.randn(2, 4, 3) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    reference = np.mean([((s - t)[mask.bool()] ** 2).mean().item() for s, t in zip(student, teacher, strict=True)])
    assert float(hidden_loss(student, teacher, mask)) == pytest.approx(reference, rel=1e-6)
    padded = tuple(s.clone() for s in student)
    for s in padded:
        s[0, 3] += 100.0  # a padding position: no effect
    assert float(hidden_loss(padded, teacher, mask)) == pytest.approx(reference, rel=1e-6)


def test_a_student_identical_to_its_teacher_has_only_its_task_loss(tmp_path: Path) -> None:
    model = tiny_model().eval()
    run = save_as_finished_run(model, tmp_path / "teacher", {"rte": ["a", "b"], "stsb": None})
    cfg = DistillConfig(teacher=str(run), task_weight=0.5, logit_weight=1.0, hidden_weight=1.0)
    hook = Distillation(cfg, ["rte", "stsb"])
    student = copy.deepcopy(model)
    hook.setup(student)
    x = torch.randint(5, 1000, (3, 9))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1, 1])}
    out = student("rte", **batch)
    assert len(out["hidden_states"]) == 2
    total = hook.batch_loss("rte", batch, out, out["loss"])
    assert float(total.detach()) == pytest.approx(0.5 * float(out["loss"].detach()), rel=1e-5)
    assert hook.metrics()["distill/logit_loss"] == pytest.approx(0.0, abs=1e-6)
    assert hook.metrics()["distill/hidden_loss"] == pytest.approx(0.0, abs=1e-8)
    other = tiny_model(seed=1)  # a different student: both terms positive, and gradients reach it
    hook.setup(other)
    out = other("stsb", **{**batch, "labels": torch.tensor([0.1, 2.0, 3.0])})
    total = hook.batch_loss("stsb", batch, out, out["loss"])
    total.backward()
    assert hook.metrics()["distill/logit_loss"] > 0 and hook.metrics()["distill/hidden_loss"] > 0
    assert other.encoder.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in hook.teacher.parameters())


def test_a_teacher_without_heads_is_refused_for_logit_distillation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distill.teacher: .* no task heads; set distill.logit_weight=0"):
        Distillation(DistillConfig(teacher="configs/arch/tiny-bert"), ["rte"])
    run = save_as_finished_run(tiny_model(tasks=(("rte", 2),)), tmp_path / "t", {"rte": ["a", "b"]})
    with pytest.raises(ConfigError, match="no head for task 'stsb'"):
        Distillation(DistillConfig(teacher=str(run)), ["rte", "stsb"])


def test_a_task_teacher_gives_its_tasks_logits_and_the_shared_teacher_the_rest(tmp_path: Path) -> None:
    """Per-task teachers (distill.task_teachers): the logit target of a named task is its own teacher's, block
    outputs and the other tasks' logits the shared teacher's; the logit loss is checked against logit_loss."""
    shared = tiny_model().eval()
    own = tiny_model(seed=3, tasks=(("rte", 2),)).eval()
    shared_run = save_as_finished_run(shared, tmp_path / "shared", {"rte": ["a", "b"], "stsb": None})
    own_run = save_as_finished_run(own, tmp_path / "own", {"rte": ["a", "b"]})
    cfg = DistillConfig(teacher=str(shared_run), task_teachers={"rte": str(own_run)}, hidden_weight=1.0)
    hook = Distillation(cfg, ["rte", "stsb"])
    student = copy.deepcopy(shared)  # identical to the shared teacher
    hook.setup(student)
    x = torch.randint(5, 1000, (3, 9))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1, 1])}
    out = student("rte", **batch)
    hook.batch_loss("rte", batch, out, out["loss"])
    with torch.no_grad():
        reference = logit_loss(out["logits"], own("rte", input_ids=x, attention_mask=batch["attention_mask"])["logits"],
                               cfg.temperature)
    assert float(reference) > 1e-3
    assert hook.metrics()["distill/logit_loss"] == pytest.approx(float(reference), rel=1e-5)
    assert hook.metrics()["distill/hidden_loss"] == pytest.approx(0.0, abs=1e-8)  # from the shared teacher
    out = student("stsb", **{**batch, "labels": torch.tensor([0.1, 2.0, 3.0])})
    hook.batch_loss("stsb", batch, out, out["loss"])
    assert hook.metrics()["distill/logit_loss"] == pytest.approx(0.0, abs=1e-6)  # not named: the shared teacher
    only_own = Distillation(DistillConfig(task_teachers={"rte": str(own_run)}), ["rte"])  # logits alone
    assert only_own.teacher is None
    out = student("rte", **batch)
    only_own.batch_loss("rte", batch, out, out["loss"])
    assert only_own.metrics()["distill/logit_loss"] == pytest.approx(float(reference), rel=1e-5)


def test_task_teachers_share_folders_and_need_no_head_of_the_shared_teacher(tmp_path: Path) -> None:
    """Block outputs come from a shared teacher without the task's head; one folder is one module, whatever its
    spelling or role; a shared teacher that would give nothing is not loaded; a head of another width is refused."""
    shared = tiny_model(tasks=(("stsb", 1),)).eval()
    own = tiny_model(seed=3).eval()
    shared_run = save_as_finished_run(shared, tmp_path / "shared", {"stsb": None})
    own_run = save_as_finished_run(own, tmp_path / "own", {"rte": ["a", "b"], "stsb": None})
    cfg = DistillConfig(teacher=str(shared_run), task_teachers={"rte": str(own_run), "stsb": f"{own_run}/"},
                        hidden_weight=1.0)
    hook = Distillation(cfg, ["rte", "stsb"])
    assert hook.task_teachers["rte"] is hook.task_teachers["stsb"] is not hook.teacher
    student = copy.deepcopy(shared)
    student.heads["rte"] = copy.deepcopy(own.heads["rte"])
    student.outputs["rte"] = 2
    hook.setup(student)
    x = torch.randint(5, 1000, (3, 9))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1, 1])}
    out = student("rte", **batch)
    hook.batch_loss("rte", batch, out, out["loss"])  # the shared teacher has no rte head
    assert hook.metrics()["distill/hidden_loss"] == pytest.approx(0.0, abs=1e-8)
    same = Distillation(cfg.model_copy(update={"teacher": str(own_run)}), ["rte", "stsb"])
    assert same.task_teachers["rte"] is same.teacher
    unused = Distillation(cfg.model_copy(update={"hidden_weight": 0.0}), ["rte", "stsb"])
    assert unused.teacher is None
    narrow = tiny_model(seed=4, tasks=(("rte", 3), ("stsb", 1)))
    with pytest.raises(ConfigError, match="distill.task_teachers.rte: its head for task 'rte' has 2 outputs, the "
                                          "student's 3"):
        hook.setup(narrow)


def test_task_teachers_are_checked_before_anything_loads(tmp_path: Path) -> None:
    own_run = save_as_finished_run(tiny_model(tasks=(("rte", 2),)), tmp_path / "own", {"rte": ["a", "b"]})
    with pytest.raises(ValueError, match="distill.hidden_weight: block outputs come from distill.teacher"):
        DistillConfig(task_teachers={"rte": str(own_run)}, hidden_weight=1.0)
    with pytest.raises(ValueError, match="distill.task_teachers: they give logits only"):
        DistillConfig(teacher=str(own_run), task_teachers={"rte": str(own_run)}, logit_weight=0.0)
    with pytest.raises(ValueError, match="distill.task_teachers: 'cola' is not one of the tasks"):
        ExperimentConfig(tasks=[{"name": "rte"}], distill={"task_teachers": {"cola": str(own_run)}})
    with pytest.raises(ValueError, match="distill.task_teachers: task 'stsb' has no teacher"):
        ExperimentConfig(tasks=[{"name": "rte"}, {"name": "stsb"}], distill={"task_teachers": {"rte": str(own_run)}})
    named = ExperimentConfig(tasks=[{"name": "SST-2"}, {"name": "rte"}],
                             distill={"teacher": "x", "task_teachers": {"RTE": "a", "Sst-2": "b"}})
    assert list(named.distill.task_teachers) == ["rte", "sst2"]  # as the data names them, in one order
    from mtp.checks import check_sources

    cases = {str(own_run): "distill.task_teachers.stsb: .* has no head for task 'stsb'",
             str(tmp_path): "distill.task_teachers.stsb: .* holds no finished mtp run .*, so it has no task head"}
    for folder, message in cases.items():
        cfg = ExperimentConfig(tasks=[{"name": "rte"}, {"name": "stsb"}],
                               distill={"task_teachers": {"rte": str(own_run), "stsb": folder}})
        with pytest.raises(ConfigError, match=message):
            check_sources(cfg)
        with pytest.raises(ConfigError, match=message):
            Distillation(cfg.distill, ["rte", "stsb"])


def test_init_from_copies_the_encoder_and_heads(tmp_path: Path) -> None:
    source = tiny_model(seed=3, tasks=(("rte", 2), ("stsb", 1), ("cola", 2)))
    run = save_as_finished_run(source, tmp_path / "run", {"rte": ["a", "b"], "stsb": None, "cola": ["x", "y"]})
    target = tiny_model(seed=4, tasks=(("rte", 2),))  # a single-task model from a multitask run
    initialise_from_run(target, run)
    expected = source.state_dict()
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    with pytest.raises(ConfigError, match="no head for task 'mnli'"):
        initialise_from_run(tiny_model(tasks=(("mnli", 3),)), run)
    with pytest.raises(ConfigError, match="encoder.init_from: .* holds no finished mtp run"):
        initialise_from_run(tiny_model(), tmp_path / "nothing")


def test_element_wise_masks_are_fixed_for_the_final_fine_tuning() -> None:
    model = tiny_model()
    cfg = pruning_settings(method="magnitude", budget=0.4, warmup_ratio=0.1, cooldown_ratio=0.1, finetune_ratio=0.3)
    hook = build_pruning(cfg, 20)[0]
    hook.setup(model)
    assert hook.schedule_end == 14
    for step in range(1, 15):
        hook.on_optimizer_step(model, step)
    assert not hook.fixed and hook.density == pytest.approx(hook.budget.density)
    hook.on_optimizer_step(model, 15)
    assert hook.fixed
    before = [m.mask.clone() for m in hook.modules]
    with torch.no_grad():
        for m in hook.modules:  # the weights move on: magnitude would pick other entries
            m.weight.copy_(torch.randn_like(m.weight))
    for step in range(16, 21):
        hook.on_optimizer_step(model, step)
    assert all(torch.equal(a, m.mask) for a, m in zip(before, hook.modules, strict=True))
    report = hook.final_report(model)
    assert report["within_budget"] and report["fixed_masks_from_step"] == 15
    resumed = build_pruning(cfg, 20)[0]
    resumed.load_state_dict(hook.state_dict())
    assert resumed.fixed and resumed.step == 20


def test_rank_gates_are_deterministic_off_the_ramp_and_ranks_fixed_for_the_fine_tuning() -> None:
    model = tiny_model().train()
    cfg = pruning_settings(method="rank", budget=0.4, warmup_ratio=0.2, cooldown_ratio=0.1, finetune_ratio=0.2)
    hook = build_pruning(cfg, 20)[0]
    hook.setup(model)
    x = torch.randint(5, 1000, (2, 7))
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)  # the same dropout: only sampled gates could make the two passes differ
        outputs.append(model("rte", input_ids=x, attention_mask=torch.ones_like(x))["logits"])
    torch.testing.assert_close(outputs[0], outputs[1])  # the dense phase: no sampled gates, the dense map
    assert hook.extra_loss(model, 0) is None
    for step in range(1, 5):
        hook.on_optimizer_step(model, step)
    assert all(m.sample for m in hook.modules)  # the ramp: sampled gates
    for step in range(5, 18):
        hook.on_optimizer_step(model, step)
    assert hook.fixed and hook.projected and not any(m.sample for m in hook.modules)
    keep = [m.keep.clone() for m in hook.modules]
    with torch.no_grad():
        for m in hook.modules:
            m.log_alpha.add_(torch.randn_like(m.log_alpha))
    for step in range(18, 21):
        hook.on_optimizer_step(model, step)
    report = hook.final_report(model)
    assert all(torch.equal(a, m.keep) for a, m in zip(keep, hook.modules, strict=True))
    assert report["within_budget"] and report["fixed_ranks_from_step"] == 17


def test_gate_groups_keep_a_constant_learning_rate() -> None:
    from mtp.training import lr_schedule

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "constant_lr": True}], lr=1.0)
    schedule = lr_schedule(opt, warmup=2, total=10)
    seen = []
    for _ in range(9):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    assert [s[1] for s in seen] == [1.0] * 9
    assert [round(s[0], 3) for s in seen[:4]] == [0.5, 1.0, 1.0, 0.875]


def test_recipes_that_leave_the_new_keys_alone_keep_their_fingerprints() -> None:
    """The committed results of the long comparison carry the fingerprints of their recipes: the dense and movement
    runs still match after distillation, init_from, finetune_ratio and the soft-movement defaults were added; the
    distilled comparison's rank runs match with the Lagrangian alone, the recipe they ran before rank's default
    changed."""
    from mtp.compare import ComparePlan, load_compare_config, recipe_fingerprint

    cfg = load_compare_config(ROOT / "configs/compare_minilm_long.yaml")
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    kept = ROOT / cfg.results_dir / "runs"
    checked = 0
    for spec in plan.runs:
        if spec.method in ("none", "movement"):
            stored = json.loads((kept / f"{spec.name}.json").read_text())["recipe"]
            assert recipe_fingerprint(plan, spec) == stored, spec.name
            checked += 1
    assert checked == 30
    spec = plan.runs[0]
    with_teacher = cfg.model_copy(update={"overrides": [*cfg.overrides, "distill.teacher=runs/x"]})
    assert recipe_fingerprint(ComparePlan.build(with_teacher, ROOT / cfg.base), spec) != recipe_fingerprint(plan, spec)
    distilled = load_compare_config(ROOT / "configs/compare_minilm_distill.yaml")  # kept after task_teachers came
    distilled_plan = ComparePlan.build(distilled, ROOT / distilled.base)
    kept = ROOT / distilled.results_dir / "runs"
    runs = [s for s in distilled_plan.runs if s.seed is None and (kept / f"{s.name}.json").is_file()]
    assert len(runs) >= 40
    # Two recipe changes since the first grid, each changing exactly its runs: rank's size control became its default
    # (with the Lagrangian alone, `lag_limit: null`, rank's runs are the recipes they were), and the length study
    # moved four tasks' single-task runs to 1,500 steps (`single_task_steps: null` gives the first grid's 500). A kept
    # run is of the grid before or of the rerun.
    first_grid = distilled.model_copy(update={"single_task_steps": None, "overrides_by_run": {
        **distilled.overrides_by_run, "-rank-": ["pruning.lag_limit=null"]}})
    first_plan = ComparePlan.build(first_grid, ROOT / distilled.base)
    longer = set(distilled.single_task_steps)
    for spec in runs:
        stored = json.loads((kept / f"{spec.name}.json").read_text())["recipe"]
        now = recipe_fingerprint(distilled_plan, spec)
        before = recipe_fingerprint(first_plan, first_plan.by_name[spec.name])
        assert (now != before) == (spec.method == "rank" or spec.task in longer and spec.method != "none"), spec.name
        assert stored in (now, before), spec.name
    spec = next(s for s in runs if s.name == "mt-magnitude-0.5")
    per_task = distilled.model_copy(update={"pruned_overrides": [*distilled.pruned_overrides,
                                                                 'distill.task_teachers={"rte": "x"}']})
    per_task_plan = ComparePlan.build(per_task, ROOT / distilled.base)
    assert recipe_fingerprint(per_task_plan, per_task_plan.by_name[spec.name]) != recipe_fingerprint(distilled_plan,
                                                                                                     spec)


def test_a_hugging_face_encoder_teaches_hidden_states(tmp_path: Path) -> None:
    encoder = tiny_model(seed=2).encoder
    encoder.save_pretrained(tmp_path / "hf")
    hook = Distillation(DistillConfig(teacher=str(tmp_path / "hf"), logit_weight=0.0, hidden_weight=1.0), ["rte"])
    student = tiny_model(seed=2).eval()
    hook.setup(student)
    x = torch.randint(5, 1000, (2, 6))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1])}
    out = student("rte", **batch)
    hook.batch_loss("rte", batch, out, out["loss"])
    assert hook.metrics()["distill/hidden_loss"] == pytest.approx(0.0, abs=1e-8)  # the same encoder


# ---------------------------------------------------------------- real 2-rank runs


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import launch

    out = tmp_path_factory.mktemp("teacher")
    launch(["--config", "configs/tiny.yaml", f"output_dir={out}"])
    return out


STUDENT = ["pruning.budget=0.3", "pruning.warmup_ratio=0.25", "pruning.cooldown_ratio=0.125",
           "pruning.finetune_ratio=0.25", "distill.hidden_weight=1.0", "distill.task_weight=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "stage"), [("rank", 3), ("magnitude", 2), ("soft_movement", 1), ("movement", 0)])
def test_a_pruned_run_starts_from_and_distils_from_a_finished_run(teacher_run: Path, tmp_path: Path, method: str,
                                                                  stage: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import launch, results

    launch(["--config", "configs/tiny.yaml", f"pruning.method={method}", *STUDENT,
            f"train.deepspeed_config=ds_configs/cpu_zero{stage}.json", f"encoder.init_from={teacher_run}",
            f"distill.teacher={teacher_run}", f"output_dir={tmp_path}"])
    res = results(tmp_path)
    report = res["pruning"]
    assert report["within_budget"]
    assert report["fixed_ranks_from_step" if method == "rank" else "fixed_masks_from_step"] == 7  # 8 steps, last 2
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert {"distill/task_loss", "distill/logit_loss", "distill/hidden_loss"} <= set(events.Tags()["scalars"])
    if method == "rank":  # the gates keep their rate through DeepSpeed's scheduler; the weights warm up and decay
        assert [e.value for e in events.Scalars("train/lr/gates")] == pytest.approx([0.05] * 4)
        assert len({e.value for e in events.Scalars("train/lr/decay")}) > 1


@pytest.mark.slow
def test_bad_teacher_and_init_sources_exit_2_before_anything_starts(teacher_run: Path, tmp_path: Path) -> None:
    from tests.conftest import launch

    cases = {f"encoder.init_from={tmp_path}": "encoder.init_from: .* holds no finished mtp run",
             "distill.teacher=configs/arch/tiny-bert": "distill.teacher: .* has no task heads",
             f"distill.teacher={teacher_run}": "distill.teacher: .* has no head for task 'cola'"}
    for override, message in cases.items():  # the teacher knows rte and stsb, not cola
        args = ["--config", "configs/tiny.yaml", override, f"output_dir={tmp_path / 'out'}",
                "tasks=[{name: rte, max_train_examples: 8}, {name: cola, max_train_examples: 8}]"]
        proc = launch(args, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]
