"""Instruction following: chat-template SFT, then answers to MT-Bench questions (judged only by a local judge).

Without ``--judge-model`` the family writes the answers and counts them; reference-overlap numbers against
FastChat's GPT-4 answers (math/reasoning/coding only) are reported as ``ref_*`` and are never MT-Bench scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kasa_peft.checkpoint import atomic_write_text

from . import instruction
from .common import cap_items
from .protocol import TaskFamily

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig


def chat_prompt(tokenizer, user_text: str) -> str:
    messages = [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"User: {user_text}\nAssistant:"


class InstructionFamily(TaskFamily):
    name = "instruction"
    kind = "causal"
    tasks = ("instruction",)
    PRESETS = {
        # quick: RunConfig's small defaults. There is no "paper" preset: the KaSA paper's instruction-tuning
        # hyper-parameters are not in the sources available offline.
        "quick": {"instruction": {}},
    }

    def primary_metric(self, config: "RunConfig") -> str:
        return "judge_score" if config.judge_model else "answered"

    def load_train(self, config: "RunConfig") -> list[dict]:
        from .alpaca import load_alpaca

        return cap_items(load_alpaca(config.data_dir), config.train_limit)

    def load_eval(self, config: "RunConfig") -> dict[str, Any]:
        questions = cap_items(instruction.load_mt_bench_questions(config.data_dir), config.eval_limit)
        return {"questions": questions, "references": instruction.load_mt_bench_references(config.data_dir)}

    def encode(self, items: list[dict], tokenizer, config: "RunConfig") -> list[dict]:
        from ..generation import encode_sft_example

        # Stanford Alpaca's train.py: prompt + output + eos, the loss on the output.
        return [encode_sft_example(tokenizer, item["prompt"], item["target"], config.max_length,
                                   train_on_inputs=config.train_on_inputs) for item in items]

    def collator(self, tokenizer) -> Callable:
        from ..generation import SFTCollator

        return SFTCollator(tokenizer.pad_token_id)

    def evaluate(self, model, tokenizer, config: "RunConfig", eval_data: Any, out_dir: Path) -> dict[str, float]:
        from ..generation import decoding_options, generate_texts
        from ..metrics.e2e import score_e2e

        questions, references = eval_data["questions"], eval_data["references"]
        prompts = [chat_prompt(tokenizer, q["turns"][0]) for q in questions]
        answers = generate_texts(model, tokenizer, prompts, config.eval_batch_size, description="MT-Bench turn 1",
                                 **decoding_options(config))
        out_dir.mkdir(parents=True, exist_ok=True)
        records = [{"question_id": q["question_id"], "category": q["category"], "answer": a} for q, a in zip(questions, answers)]
        atomic_write_text(out_dir / "mt_bench_answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        with_refs = [(a, references[q["question_id"]][0]) for q, a in zip(questions, answers) if q["question_id"] in references]
        metrics: dict[str, float] = {"answered": float(len(answers)), "with_reference": float(len(with_refs))}
        if with_refs:
            scores = score_e2e([a if a.strip() else "." for a, _ in with_refs], [[r] for _, r in with_refs],
                               metrics=("BLEU", "ROUGE_L"))
            metrics.update({f"ref_{k}": v for k, v in scores.items()})
        if config.judge_model:
            from ..judge import judge_answers

            metrics.update(judge_answers(config.judge_model, questions, answers, config.data_dir))
        return metrics


FAMILY = InstructionFamily()
