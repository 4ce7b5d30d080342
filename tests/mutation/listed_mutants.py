"""Apply each deliberate mistake listed in issue 8 to a *copy* of the package and check that the tests kill it.

    python tests/mutation/listed_mutants.py            # all mutants
    python tests/mutation/listed_mutants.py merge-bf16 # one of them

The working tree is never modified: ``src/`` is copied to a temporary directory, one textual replacement is made
there, and the named test selection runs against the copy (``PYTHONPATH``). A mutant is *killed* when the selection
fails; the script exits non-zero if any mutant survives or if a replacement no longer applies (the code moved on:
update the table). Not collected by pytest (the file name does not start with ``test_``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/kasa_peft
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS = [
    Mutant(
        "dropout-on-truncation",
        "layer.py",
        "output = output - F.linear(F.linear(x, self.minor_vh), self.minor_u_sigma)",
        "output = output - F.linear(F.linear(self.dropout(x), self.minor_vh), self.minor_u_sigma)",
        ("tests/test_layer_numerics.py", "-k", "dropout"),
    ),
    Mutant(
        "no-dropout-on-input",
        "layer.py",
        "output = F.linear(F.linear(self.dropout(x), self.lora_A)",
        "output = F.linear(F.linear(x, self.lora_A)",
        ("tests/test_layer_numerics.py", "-k", "dropout"),
    ),
    Mutant(
        "no-unmerge-when-disabled",
        "layer.py",
        "if self.adapters_disabled and self.merged_adapters:\n            self.unmerge()",
        "if self.adapters_disabled and self.merged_adapters:\n            pass",
        ("tests/test_layer_numerics.py", "-k", "disabling_merged"),
    ),
    Mutant(
        "safe-merge-check-removed",
        "layer.py",
        "if safe_merge and not bool(torch.isfinite(merged).all()):",
        "if False:",
        ("tests/test_layer_numerics.py", "-k", "safe_merge"),
    ),
    Mutant(
        "adapters-in-base-dtype",
        "model.py",
        "return torch.float64 if weight.dtype == torch.float64 else torch.float32",
        "return weight.dtype",
        ("tests/test_layer_numerics.py", "-k", "float32_on_half"),
    ),
    Mutant(
        "merge-accumulated-in-bf16",
        "base_layers/dense.py",
        "accum = torch.promote_types(weight.dtype, torch.float32)",
        "accum = weight.dtype",
        ("tests/test_layer_numerics.py", "-k", "rounds_once"),
    ),
    Mutant(
        "regulariser-always-divided-by-ga",
        "trainer.py",
        "loss = loss + (reg * share).to(loss.dtype)",
        "loss = loss + (reg / self.current_gradient_accumulation_steps).to(loss.dtype)",
        ("tests/test_trainer.py", "-k", "gradient_accumulation"),
    ),
]


def run(mutant: Mutant, apply: bool = True) -> tuple[bool, str]:
    """(tests failed, first failing test id) for the mutant (or, with ``apply=False``, for the unmutated copy)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        target = src / "kasa_peft" / mutant.file
        text = target.read_text()
        if text.count(mutant.original) != 1:
            raise SystemExit(f"{mutant.name}: the original text occurs {text.count(mutant.original)}× in {mutant.file}; update the table.")
        if apply:
            target.write_text(text.replace(mutant.original, mutant.mutated))
        env = {**os.environ, "PYTHONPATH": str(src)}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )
        failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        last = result.stdout.strip().splitlines()[-1:] or [""]
        return result.returncode != 0, failed[0] if failed else last[0]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    # Control: every selection passes on the unmutated copy, so a kill below is the mutant's doing.
    for tests in dict.fromkeys(m.tests for m in chosen):
        failed, detail = run(next(m for m in chosen if m.tests == tests), apply=False)
        if failed:
            raise SystemExit(f"control run fails without any mutant ({' '.join(tests)}): {detail}")
    survivors = []
    for mutant in chosen:
        killed, detail = run(mutant)
        print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name}: {detail}", flush=True)
        if not killed:
            survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors)}/{len(chosen)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
