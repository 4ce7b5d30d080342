"""The README's 4-bit example runs as written (CPU, bitsandbytes), and its FSDP/SFT snippets name real APIs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_4bit_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed: pip install "kasa-peft[quant]"')
    (block,) = [b for b in _python_blocks() if "BitsAndBytesConfig" in b]
    monkeypatch.chdir(tmp_path)  # it writes tiny-llama/ and kasa-4bit/ into the working directory
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    import torch

    merged = namespace["merged"]
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (tmp_path / "kasa-4bit" / "kasa_adapter.safetensors").is_file()


def test_stack_snippets_import_what_exists():
    text = README.read_text()
    for statement in ("from kasa_peft.trl import KasaSFTTrainer", "from kasa_peft.fsdp import unsharded"):
        assert statement in text
    pytest.importorskip("trl", reason='TRL is not installed: pip install "kasa-peft[trl]"')
    from kasa_peft.fsdp import unsharded  # noqa: F401
    from kasa_peft.trl import KasaSFTTrainer  # noqa: F401
