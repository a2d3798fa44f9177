"""The README's Python examples run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}  # the blocks continue one another, as a reader runs them
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "digits-cnn" / "model.safetensors").is_file()
    assert namespace["adaptive"].success_rate > namespace["naive"].success_rate  # the README's claim
