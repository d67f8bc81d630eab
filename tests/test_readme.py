"""The README's Python examples run as written, in order, as one script (later ones build on earlier ones)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    assert len(EXAMPLES) >= 2
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(EXAMPLES), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "'realized': '1:8'" in printed  # the usage example finalizes and verifies its patterns
    assert (tmp_path / "vit-sparse" / "model.safetensors").exists()
    assert (tmp_path / "model-nm.safetensors").exists()
