"""The Hugging Face Trainer integration: schedule by optimizer step, logs, checkpoints and exact resume."""

import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import nonzeros_per_group
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D

from nmflow import Recipe, sparsify
from nmflow.diagnostics import flip_rate
from nmflow.integrations import NMSparsityCallback
from nmflow.integrations.hf_trainer import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
TOTAL, DENSE, FINETUNE, SAVE_AT = 20, 4, 4, 10  # resumed at step 10: inside the sparse phase 4-16
FF_LAYERS = ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def token_data(count: int = 32, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 64, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in rows]


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        max_steps=TOTAL,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def recipe(method: str) -> Recipe:
    return Recipe(method, {"ff": "1:16"}, dense_steps=DENSE, finetune_steps=FINETUNE)


def train(method: str, output_dir, resume=None, extra_callbacks=(), **overrides):
    """One Trainer run; returns the trainer, its nmflow callback and the final weights."""
    model = tiny_gpt2()
    callback = NMSparsityCallback(recipe(method), verbose=False)
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=token_data(),
        callbacks=[callback, *extra_callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return trainer, callback, weights


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (the Trainer still saves that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def nmflow_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "nmflow/D" in entry]


def assert_exact_one_in_sixteen(model) -> None:
    modules = dict(model.named_modules())
    for name in FF_LAYERS:
        module = modules[name]
        assert type(module) is Conv1D and not hasattr(module, "parametrizations")  # plain again
        counts = nonzeros_per_group(module.weight, 16, in_dim=0)  # Conv1D weight is [in, out]
        assert counts.max() == 1


# ---------------------------------------------------------------------- diagnostics
def test_flip_rate_pools_entries_over_tensors():
    before = {"a": torch.tensor([True, True, False, False]), "b": torch.ones(4, dtype=torch.bool)}
    after = {"a": torch.tensor([True, False, True, False]), "b": torch.ones(4, dtype=torch.bool)}
    assert flip_rate(before, after) == 2 / 8
    assert flip_rate(before, before) == 0.0
    with pytest.raises(ValueError):
        flip_rate(before, {"a": after["a"]})


def test_current_masks_are_all_true_while_dense_and_n_of_m_after():
    model = tiny_gpt2()
    sp = sparsify(model, Recipe("ste", {"ff": "1:16"}, dense_steps=1, finetune_steps=0), total_steps=3, verbose=False)
    assert all(mask.all() for mask in sp.masks().values())
    sp.step()
    masks = sp.masks()
    assert set(masks) == set(FF_LAYERS)
    for mask in masks.values():
        assert (nonzeros_per_group(mask, 16, in_dim=0) == 1).all()


# ---------------------------------------------------------------------- training
def test_trainer_run_ends_exact_and_logs_the_schedule(tmp_path):
    trainer, callback, _ = train("mdgf-exp", tmp_path, save_strategy="no")
    assert_exact_one_in_sixteen(trainer.model)
    assert callback.sparsifier.step_count == TOTAL
    assert {r["realized"] for r in callback.sparsifier.verify()} == {"1:16"}
    trainer.save_model(str(tmp_path / "final"))
    assert_exact_one_in_sixteen(GPT2LMHeadModel.from_pretrained(str(tmp_path / "final")))

    logs = {entry["step"]: entry for entry in nmflow_logs(trainer)}
    assert sorted(logs) == list(range(1, TOTAL + 1))  # every training log carries the nmflow keys
    # a log at step g describes the next forward pass, which runs under schedule step g
    for step, entry in logs.items():
        expected_phase = 0 if step < DENSE else 1 if step < TOTAL - FINETUNE else 2
        assert entry["nmflow/phase"] == expected_phase
        assert entry["nmflow/density/ff"] == (1.0 if step < DENSE else 1 / 16)
        assert 0.0 <= entry["nmflow/flip_rate/ff"] <= 1.0
        assert entry["nmflow/grad_abs_var/ff"] > 0 and entry["nmflow/exp_avg_sq_norm/ff"] > 0
    assert all(logs[s]["nmflow/D"] == 1.0 for s in range(1, DENSE))
    decaying = [logs[s]["nmflow/D"] for s in range(DENSE, TOTAL - FINETUNE)]
    assert decaying[0] == 1.0 and all(a > b for a, b in zip(decaying, decaying[1:]))
    # the default decay reaches D = 0.01 a quarter of the run after the dense phase: step 9 here
    assert math.isclose(logs[DENSE + round(0.25 * TOTAL)]["nmflow/D"], 0.01, rel_tol=1e-6)
    assert all(logs[s]["nmflow/D"] == 0.0 for s in range(TOTAL - FINETUNE, TOTAL + 1))
    # dense -> 1:16 between steps 3 and 4: every pruned entry flips, 15 of each 16
    assert logs[DENSE]["nmflow/flip_rate/ff"] == 15 / 16
    assert all(logs[s]["nmflow/flip_rate/ff"] == 0.0 for s in range(1, DENSE))
    # the last log reads Adam's state after the last step, which the optimizer still holds
    modules = dict(trainer.model.named_modules())
    moments = [trainer.optimizer.state[modules[name].weight]["exp_avg_sq"] for name in FF_LAYERS]
    expected = sum(float(m.var()) for m in moments) / len(moments)
    assert math.isclose(logs[TOTAL]["nmflow/exp_avg_sq_var/ff"], expected, rel_tol=1e-5)


def test_oneshot_masks_stay_frozen_after_pruning(tmp_path):
    trainer, _, _ = train("oneshot", tmp_path, save_strategy="no")
    logs = {entry["step"]: entry for entry in nmflow_logs(trainer)}
    assert logs[DENSE]["nmflow/flip_rate/ff"] == 15 / 16
    assert all(logs[s]["nmflow/flip_rate/ff"] == 0.0 for s in range(DENSE + 1, TOTAL + 1))
    assert_exact_one_in_sixteen(trainer.model)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    steps = 8
    trainer, callback, _ = train(
        "ste", tmp_path, save_strategy="no", max_steps=steps, gradient_accumulation_steps=3, logging_steps=2
    )
    assert trainer.state.global_step == steps
    assert callback.sparsifier.step_count == steps  # not 3 * steps forward/backward passes
    logs = {entry["step"]: entry for entry in nmflow_logs(trainer)}
    assert sorted(logs) == [2, 4, 6, 8]
    assert logs[2]["nmflow/density/ff"] == 1.0 and logs[4]["nmflow/density/ff"] == 1 / 16
    assert logs[4]["nmflow/flip_rate/ff"] == 15 / 16  # masks kept before the optimizer step that ended in a log
    assert_exact_one_in_sixteen(trainer.model)


class LogRecorder(TrainerCallback):
    """Stands for a reporter: keeps the keys of every log it is shown."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs))


@pytest.mark.parametrize("installed", [True, False])
def test_install_puts_the_keys_in_front_of_reporters(tmp_path, installed):
    recorder = LogRecorder()
    callback = NMSparsityCallback(recipe("ste"), verbose=False)
    args = training_args(tmp_path, save_strategy="no", max_steps=8)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[recorder])
    if installed:
        callback.install(trainer)
    else:
        trainer.add_callback(callback)  # after the recorder, as Trainer(callbacks=[...]) places it after reporters
    trainer.train()
    step_logs = [keys for keys in recorder.keys if "loss" in keys]
    assert len(step_logs) == 8
    assert all(("nmflow/D" in keys) == installed for keys in step_logs)
    assert len(nmflow_logs(trainer)) == 8  # the Trainer's own history has them either way


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["mdgf-exp", "oneshot"])
def test_resume_from_checkpoint_continues_exactly(tmp_path, method):
    _, _, uninterrupted = train(method, tmp_path / "full")

    interrupted, _, _ = train(method, tmp_path / "part", extra_callbacks=[StopAt(SAVE_AT)])
    assert interrupted.state.global_step == SAVE_AT
    checkpoint = tmp_path / "part" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["step"] == SAVE_AT
    assert bool(saved["fixed_masks"]) == (method == "oneshot")

    trainer, callback, resumed = train(method, tmp_path / "part", resume=str(checkpoint))
    assert callback.sparsifier.step_count == TOTAL
    assert [e["step"] for e in nmflow_logs(trainer)] == list(range(1, TOTAL + 1))
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_resume_without_state_file_warns_about_one_shot_masks(tmp_path):
    train("oneshot", tmp_path, extra_callbacks=[StopAt(SAVE_AT)])
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    os.remove(checkpoint / STATE_FILE)
    with pytest.warns(UserWarning, match="one-shot masks"):
        _, callback, _ = train("oneshot", tmp_path, resume=str(checkpoint))
    assert callback.sparsifier.step_count == TOTAL


# ---------------------------------------------------------------------- example
def test_example_script_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--steps", "12", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1:16" in result.stdout and "exact" in result.stdout


# ---------------------------------------------------------------------- several processes under Accelerate
def _accelerate_worker(output_dir: str) -> None:
    """One process of `accelerate.debug_launcher` (what `accelerate launch --num_processes 2 --cpu` sets up)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    torch.set_num_threads(1)
    # the process group gives up after 60 s, so a dead peer fails the test instead of hanging it; debug_launcher
    # creates the group without a timeout (gloo's default: 30 min) and Accelerate passes none on CPU, so set it here
    _set_pg_timeout(timedelta(seconds=60))
    trainer, callback, weights = train("srste", output_dir, save_strategy="no")
    rank = trainer.args.process_index
    logs = [(entry["step"], entry["nmflow/D"]) for entry in nmflow_logs(trainer)]
    group = torch.distributed.distributed_c10d._get_default_group()
    timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    record = {"world": trainer.args.world_size, "steps": callback.sparsifier.step_count, "logs": logs, **weights}
    record["timeout"] = timeout
    torch.save(record, Path(output_dir) / f"rank{rank}.pt")


def test_trainer_under_accelerate_with_two_processes_keeps_ranks_identical(tmp_path):
    # debug_launcher forks; a fork of this test process, whose OpenMP pool earlier tests used, can hang in torch's
    # first parallel op (GNU OpenMP is not fork-safe), so launch from a fresh interpreter
    launch = (
        "from accelerate import debug_launcher; import test_hf_trainer as t; "
        f"debug_launcher(t._accelerate_worker, args=({str(tmp_path)!r},), num_processes=2)"
    )
    subprocess.run([sys.executable, "-c", launch], cwd=Path(__file__).parent, check=True, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]  # really two data-parallel processes
    assert [r.pop("timeout") for r in ranks] == [60.0, 60.0]  # a dead peer cannot hang the test
    assert [r["steps"] for r in ranks] == [TOTAL, TOTAL]
    for name, tensor in ranks[0].items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, ranks[1][name]), f"{name} differs between ranks"
    model = tiny_gpt2()
    model.load_state_dict({k: v for k, v in ranks[0].items() if isinstance(v, torch.Tensor)})
    for name in FF_LAYERS:
        weight = dict(model.named_modules())[name].weight
        assert nonzeros_per_group(weight, 16, in_dim=0).max() == 1
