"""The tasks of nmflow train: the language model, user data, model overrides, and the fine-tune protocol."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nmflow.app.config import TrainConfig
from nmflow.app.tasks import build_task
from nmflow.app.train import train
from nmflow.core.errors import ConfigError

TINY_LM = {"n_embd": 32, "n_head": 2, "n_layer": 1}
QUIET = {"tensorboard": False, "eval_every": 4, "log_every": 2}


def _task(name="language", model=TINY_LM, data=None, block_size=16, image_size=None):
    return build_task(
        name, data=data, data_seed=0, model=model, device=torch.device("cpu"), block_size=block_size,
        image_size=image_size,
    )  # fmt: skip


def test_language_evaluation_is_the_mean_next_byte_loss_over_every_window():
    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    scores = task.evaluate(model, "val")
    data = task.splits["val"]
    usable = (len(data) - 1) // 16 * 16  # whole windows of 16 inputs + 1 target
    inputs = data[:usable].long().view(-1, 16)
    targets = data[1 : usable + 1].long().view(-1, 16)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training  # evaluation gives the model back in train mode


def test_language_run_trains_and_reports_perplexity(tmp_path):
    config = TrainConfig(
        task="language", method="srste", sparsity={"ff": "1:8"}, steps=12, model=TINY_LM, block_size=16,
        batch_size=8, out=str(tmp_path / "lm"), **QUIET,
    )  # fmt: skip
    summary = train(config, verbose=False)
    assert summary["task"] == "language" and summary["metric"] == "perplexity"
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["test_loss"] < math.log(256)  # better than uniform over bytes after 12 steps
    assert {r["realized"] for r in summary["layers"]} == {"1:8"}
    lines = [json.loads(line) for line in (tmp_path / "lm/metrics.jsonl").read_text().splitlines()]
    trained = [line for line in lines if "loss" in line]
    assert all(set(line["grad_abs_var"]) == {"ff"} for line in trained)
    assert [line["train_flops"] for line in trained] == sorted(line["train_flops"] for line in trained)
    assert summary["inference_flops"]["sparse"] < summary["inference_flops"]["dense"]


def test_unknown_model_override_is_named():
    with pytest.raises(ConfigError, match="'hidden_sise'.*ViTConfig"):
        _task("vision", model={"hidden_sise": 32})
    with pytest.raises(ConfigError, match="'hidden_size'.*GPT2Config"):
        _task("language", model={"hidden_size": 32})  # GPT-2 calls it n_embd


def test_image_size_is_for_user_data_only():
    with pytest.raises(ConfigError, match="image_size"):
        _task("vision", model={}, image_size=16)


def test_vision_task_on_a_user_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    images = (rng.random((60, 12, 12)) * 50 + labels[:, None, None] * 60).astype(np.uint8)  # classes differ in level
    np.savez(tmp_path / "data.npz", x=images, y=labels)
    config = TrainConfig(
        task="vision", data=str(tmp_path / "data.npz"), method="ste", sparsity={"ff": "1:4"}, steps=30,
        batch_size=16, out=str(tmp_path / "run"), **QUIET,
    )  # fmt: skip
    summary = train(config, verbose=False)
    assert str(tmp_path / "data.npz") in summary["test_data"]
    assert summary["test_accuracy"] > 1 / 3  # learnable: brightness separates the classes


def test_fine_tune_protocol_starts_from_the_dense_weights(tmp_path):
    common = dict(task="language", model=TINY_LM, block_size=16, batch_size=8, **QUIET)
    train(TrainConfig(method="dense", steps=8, out=str(tmp_path / "dense"), **common), verbose=False)
    dense = load_file(str(tmp_path / "dense/model.safetensors"))

    config = TrainConfig(
        method="mdgf-exp", sparsity={"ff": "1:8"}, steps=10, init_from=str(tmp_path / "dense"),
        out=str(tmp_path / "sparse"), lr=1e-12, **common,
    )  # fmt: skip
    summary = train(config, verbose=False)  # a learning rate of ~0 keeps the weights where they started
    sparse = load_file(str(tmp_path / "sparse/model.safetensors"))
    kept = sparse["transformer.h.0.mlp.c_fc.weight"] != 0
    assert torch.allclose(
        sparse["transformer.h.0.mlp.c_fc.weight"][kept], dense["transformer.h.0.mlp.c_fc.weight"][kept]
    )
    assert torch.allclose(sparse["transformer.wte.weight"], dense["transformer.wte.weight"])
    assert summary["init_from"] == str(tmp_path / "dense")


def test_init_from_a_missing_or_mismatched_run_is_refused(tmp_path):
    common = dict(task="language", block_size=16, batch_size=8, steps=4, **QUIET)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        train(TrainConfig(init_from=str(tmp_path), out=str(tmp_path / "a"), model=TINY_LM, **common), verbose=False)
    train(TrainConfig(method="dense", out=str(tmp_path / "small"), model=TINY_LM, **common), verbose=False)
    wider = {**TINY_LM, "n_embd": 64}
    with pytest.raises(ConfigError, match="do not fit this model"):
        train(
            TrainConfig(init_from=str(tmp_path / "small"), out=str(tmp_path / "b"), model=wider, **common),
            verbose=False,
        )
    assert not (tmp_path / "b").exists()
