"""E2E NLG in the LoRA repository's format: train and score on ``MR || reference`` lines, decode as the preset says.

Training pairs come from ``e2e/lora_format/train.txt`` when present, else from ``e2e/trainset.csv`` converted on the
fly by :func:`.e2e_lora_format.csv_to_lora_lines` (the converter that rebuilds ``lora_format/valid.txt`` from
``devset.csv`` byte for byte). The dev set is ``lora_format/valid.txt`` (or ``devset.csv`` converted). The model
sees ``MR ||`` and learns `` reference`` + EOS; hypotheses are scored against the tokenised LoRA-format references
grouped by MR, as ``microsoft/LoRA`` ``examples/NLG`` scores them (official E2E metric definitions).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .common import DataError, cap_items, resolve_data_dir
from .protocol import TaskFamily

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig

#: What separates the MR from the sentence in the prompt (the LoRA file has ``MR||ref``; the prompt ends at ``||``).
PROMPT_SEPARATOR = " ||"
_SPLITS = {"train": ("train.txt", "trainset.csv"), "validation": ("valid.txt", "devset.csv")}


def _converted_csv(csv_file: Path, limit: int | None) -> list[tuple[str, str]]:
    """``(MR, reference)`` in the LoRA format from an ``mr,ref`` CSV: the capped rows only, the full file cached.

    Converting a row (Moses tokenisation) costs ~2 ms, so a capped run converts only its subset, and a full
    conversion of ``trainset.csv`` (~70 s) is written once to ``$KASA_CACHE_DIR/e2e_lora_format/`` keyed by the
    CSV's SHA-256.
    """
    import hashlib

    from kasa_peft.checkpoint import atomic_write_text

    from . import e2e_lora_format as lora

    rows = lora.read_e2e_csv(csv_file, require_refs=True)
    if limit and limit < len(rows):
        return [(lora.format_lora_mr(mr), lora.tokenize_reference(ref)) for mr, ref in cap_items(rows, limit)]
    from ..models import cache_dir

    digest = hashlib.sha256(csv_file.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "e2e_lora_format" / f"{csv_file.stem}-{digest}.txt"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, "".join(line + "\n" for line in lora.csv_to_lora_lines(csv_file)))
    return lora.read_lora_format(cached)


def load_lora_pairs(split: str, data_dir=None, limit: int | None = None) -> list[tuple[str, str]]:
    """``(MR, reference)`` pairs of ``split`` in the LoRA format, at most ``limit`` (a fixed seeded subset).

    Read from ``e2e/lora_format/{train,valid}.txt`` when present, else converted from ``e2e/{trainset,devset}.csv``.
    """
    from . import e2e_lora_format

    if split not in _SPLITS:
        raise DataError(f"E2E split must be one of {sorted(_SPLITS)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError("E2E needs local data: pass --data-dir (or set KASA_DATA_DIR) to a directory with e2e/")
    lora_name, csv_name = _SPLITS[split]
    lora_file, csv_file = root / "e2e" / "lora_format" / lora_name, root / "e2e" / csv_name
    if lora_file.is_file():
        return cap_items(e2e_lora_format.read_lora_format(lora_file), limit)
    if csv_file.is_file():
        return _converted_csv(csv_file, limit)
    raise DataError(f"E2E {split}: neither {lora_file} nor {csv_file} exists; pass --data-dir pointing at shared/data")


def prompt_for(mr: str) -> str:
    return mr.strip() + PROMPT_SEPARATOR


class E2EFamily(TaskFamily):
    name = "e2e"
    kind = "causal"
    tasks = ("e2e",)
    PRESETS = {
        # quick: RunConfig's small defaults, beam 10 (the LoRA paper's width), 32 new tokens. Not a paper's protocol.
        "quick": {"e2e": {"num_beams": 10}},
        # paper: the LoRA paper's E2E setup, microsoft/LoRA examples/NLG/README.md (gpt2_ft.py / gpt2_beam.py flags),
        # which the KaSA paper follows for its E2E table.
        "paper": {
            "e2e": {
                "r": 4,                     # gpt2_ft.py --lora_dim 4
                "lora_alpha": 32,           # --lora_alpha 32
                "lora_dropout": 0.1,        # --lora_dropout 0.1
                "target_modules": None,     # LoRA adapts W_q and W_v (c_attn q/v in GPT-2) → q/v resolved per model
                "weight_decay": 0.01,       # --weight_decay 0.01
                "label_smoothing": 0.1,     # --label_smooth 0.1
                "learning_rate": 2e-4,      # --lr 0.0002, --scheduler linear
                "batch_size": 8,            # --train_batch_size 8
                "gradient_accumulation_steps": 1,  # --grad_acc 1
                "epochs": 5,                # --max_epoch 5
                "warmup_steps": 500,        # --warmup_step 500
                "max_length": 512,          # --seq_len 512
                "num_beams": 10,            # gpt2_beam.py --beam 10
                "length_penalty": 0.9,      # LoRA paper (arXiv 2106.09685) Table 11, E2E; the README's example command uses 0.8
                "no_repeat_ngram_size": 4,  # gpt2_beam.py --no_repeat_ngram_size 4
                "max_new_tokens": 64,       # gpt2_beam.py --eval_len 64
                # β, γ: no E2E value in the KaSA sources available offline; kasa-peft's (= PEFT KasaConfig's) defaults.
                "beta": 1e-4,
                "gamma": 1e-3,
            }
        },
    }

    def primary_metric(self, config: "RunConfig") -> str:
        return "BLEU"

    def load_train(self, config: "RunConfig") -> list[dict]:
        pairs = load_lora_pairs("train", config.data_dir, limit=config.train_limit)
        return [{"prompt": prompt_for(mr), "target": " " + ref} for mr, ref in pairs]

    def load_eval(self, config: "RunConfig") -> list[tuple[str, list[str]]]:
        from .e2e_lora_format import group_by_mr

        return cap_items(group_by_mr(load_lora_pairs("validation", config.data_dir)), config.eval_limit)

    def load_eval_file(self, config: "RunConfig", path: Path) -> list[tuple[str, list[str]]]:
        from ..eval_files import load_e2e_eval_file

        return cap_items(load_e2e_eval_file(path), config.eval_limit)

    def encode(self, items: list[dict], tokenizer, config: "RunConfig") -> list[dict]:
        from ..generation import encode_sft_example

        return [encode_sft_example(tokenizer, item["prompt"], item["target"], config.max_length) for item in items]

    def collator(self, tokenizer) -> Callable:
        from ..generation import SFTCollator

        return SFTCollator(tokenizer.pad_token_id)

    def loss_function(self, config: "RunConfig") -> Callable | None:
        from ..generation import causal_lm_loss

        return causal_lm_loss(config.label_smoothing) if config.label_smoothing else None

    def evaluate(self, model, tokenizer, config: "RunConfig", eval_data: Any, out_dir: Path) -> dict[str, float]:
        from ..generation import decoding_options, generate_texts
        from ..metrics.e2e import score_e2e
        from .e2e import write_e2e_reference_file, write_hypothesis_file

        if any(not refs for _, refs in eval_data):
            raise DataError("E2E evaluation needs references for every MR (an MR-only test file cannot be scored)")
        prompts = [prompt_for(mr) for mr, _ in eval_data]
        hypotheses = generate_texts(model, tokenizer, prompts, config.eval_batch_size, description="E2E decoding",
                                    **decoding_options(config))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_hypothesis_file(hypotheses, out_dir / "e2e_hypotheses.txt")
        write_hypothesis_file([mr for mr, _ in eval_data], out_dir / "e2e_mrs.txt")
        write_e2e_reference_file([refs for _, refs in eval_data], out_dir / "e2e_references.txt")
        return score_e2e(hypotheses, [refs for _, refs in eval_data])


FAMILY = E2EFamily()
