"""Write the suite's two models as transformers directories in pieces of at most 60 MiB each (for staging).

    python benchmarks/stage_models.py --output-dir staged-models     # here: → staged-models/{minilm,smollm2}/
    python benchmarks/stage_models.py --join staged-models            # there: reassemble, check SHA-256, remove parts

Weights stay float32 (exactly the harness's models). ``save_pretrained(max_shard_size="60MB")`` shards them; a shard
that is still larger (SmolLM2's 49152×576 embedding alone is 108 MiB: one tensor cannot be sharded) is cut into
``<file>.partNNN`` byte pieces. ``SHA256SUMS`` lists the whole files; ``--join`` concatenates the parts and verifies
every file against it. Then: ``--minilm staged-models/minilm --smollm2 staged-models/smollm2`` on the suite.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

MAX_SHARD = "60MB"
PIECE = 60 * 2**20


def _split_large(path: Path) -> list[Path]:
    if path.stat().st_size <= PIECE:
        return [path]
    data, parts = path.read_bytes(), []
    for index, start in enumerate(range(0, len(data), PIECE)):
        part = path.with_name(f"{path.name}.part{index:03d}")
        part.write_bytes(data[start : start + PIECE])
        parts.append(part)
    path.unlink()
    return parts


def join(staged: Path) -> None:
    """Reassemble ``*.partNNN`` files and check every file of ``SHA256SUMS``; raises on a mismatch."""
    for first in sorted(staged.rglob("*.part000")):
        whole = first.with_name(first.name.removesuffix(".part000"))
        parts = sorted(first.parent.glob(whole.name + ".part*"))
        whole.write_bytes(b"".join(p.read_bytes() for p in parts))
        for part in parts:
            part.unlink()
    for line in (staged / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        if hashlib.sha256((staged / name).read_bytes()).hexdigest() != digest:
            raise SystemExit(f"checksum mismatch: {staged / name}")


def stage(output_dir: Path) -> list[Path]:
    from kasa_peft.experiments.models import load_model

    written = []
    for name, kind in (("minilm", "classification"), ("smollm2", "causal")):
        loaded = load_model(name, kind, num_labels=2)
        target = output_dir / name
        model = loaded.model.base_model if kind == "classification" else loaded.model  # the encoder: heads are task-made
        model.save_pretrained(str(target), max_shard_size=MAX_SHARD, safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(target))
        written += sorted(p for p in target.iterdir() if p.is_file())
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(output_dir)}\n" for p in written)
    (output_dir / "SHA256SUMS").write_text(sums)
    return [piece for path in written for piece in _split_large(path)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("staged-models"))
    parser.add_argument("--join", type=Path, default=None, help="reassemble and verify a staged directory")
    args = parser.parse_args()
    if args.join is not None:
        join(args.join)
        print(f"{args.join}: files reassembled and verified against SHA256SUMS")
        return 0
    files = stage(args.output_dir)
    largest = max(files, key=lambda p: p.stat().st_size)
    print(f"{len(files)} files under {args.output_dir}; largest {largest.name}: {largest.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
