"""E2E NLG (Novikova et al., 2017) files in the official e2e-metrics layout: references grouped per MR, hypotheses.

Reading the data (LoRA format, CSV conversion) is :mod:`.e2e_lora_format`; the task protocol is :mod:`.e2e_family`.
"""

from __future__ import annotations

from pathlib import Path

from kasa_peft.checkpoint import atomic_write_text


def write_e2e_reference_file(groups: list[list[str]], path: str | Path) -> None:
    """The e2e-metrics reference format: references of one MR on consecutive lines, a blank line between MRs."""
    atomic_write_text(path, "\n\n".join("\n".join(group) for group in groups) + "\n")


def write_hypothesis_file(lines: list[str], path: str | Path) -> None:
    atomic_write_text(path, "".join(line.replace("\n", " ") + "\n" for line in lines))
