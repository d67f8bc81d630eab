"""`nmflow generate`: a language run's folder, dense then deployed, same greedy text; bad folders refused."""

import pytest
import torch
import transformers
from helpers import run_cli

import nmflow
from nmflow.app.cli import main
from nmflow.app.tasks import GPT2_CONFIG


@pytest.fixture(scope="module")
def language_run(tmp_path_factory):
    """A folder as `nmflow train --task language` leaves it: a finalized byte-level GPT-2 and config.yaml."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**GPT2_CONFIG, "n_embd": 64}, vocab_size=256, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    nmflow.sparsify(model, nmflow.Recipe("ste", sparsity={"ff": "1:16"}, dense_fraction=0), 4, verbose=False).finalize()
    model.save_pretrained(folder)
    (folder / "config.yaml").write_text("task: language\n")
    return folder, model.eval()


def test_generate_prints_the_dense_models_text_and_both_speeds(language_run, capsys):
    folder, model = language_run
    prompt = "def main("
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    with torch.no_grad():
        ids = torch.tensor([list(prompt.encode())])
        expected = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    text = bytes(expected[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
    assert out.startswith(prompt + text + "\n")
    assert "4 N:M layers deployed (fp32" in out and "tokens    identical to the dense model's" in out
    assert "dense " in out and "deployed " in out and "x)" in out


def test_generate_refuses_what_is_not_a_language_model(language_run, tmp_path, capsys):
    folder, _ = language_run
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text("{}")
    (vision / "config.yaml").write_text("task: vision\n")
    assert run_cli(["generate", str(vision), "--prompt", "x"], capsys) == (
        2,
        f"nmflow: error: {vision} is a 'vision' run; nmflow generate needs a language model\n",
    )
    status, err = run_cli(["generate", str(tmp_path), "--prompt", "x"], capsys)
    assert status == 2 and "no config.json here" in err
    status, err = run_cli(["generate", str(folder), "--prompt", "x", "--max-new-tokens", "0"], capsys)
    assert status == 2 and "--max-new-tokens must be at least 1" in err
