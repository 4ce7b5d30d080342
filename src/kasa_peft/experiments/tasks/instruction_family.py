"""Instruction following: SFT on the Alpaca subset, then both MT-Bench turns with FastChat's answering settings.

Training: ``instruction/alpaca/alpaca_5000.json`` with the Stanford Alpaca prompt (:mod:`.alpaca`), loss on the
output. Answering: :func:`kasa_peft.experiments.mt_bench.run_mt_bench` — every turn of every question, FastChat's
per-category temperature, at most ``max_new_tokens`` (FastChat: 1024), FastChat's ``model_answer`` JSONL under
``model_answer/``. The questions are rendered in the template the model was trained on (:func:`alpaca_conversation`).
With ``--judge-model`` a local judge grades them with FastChat's prompts (``mt_bench_score``); without one the run
reports counts and a reference-overlap number against GPT-4's turn-1 answers for math/reasoning/coding
(``ref_overlap_*``) — that is **not** an MT-Bench score, and nothing here calls it one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import instruction
from .common import cap_items
from .protocol import TaskFamily

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig


def alpaca_conversation(messages: list[dict]) -> str:
    """A conversation in the Alpaca template: turn 1 exactly as trained (``alpaca_prompt``), later turns appended.

    ``[u1, a1, u2]`` → ``alpaca_prompt(u1) + a1 + "\\n\\n### Instruction:\\n" + u2 + "\\n\\n### Response:"`` — the
    Alpaca sections repeated per turn (as FastChat's ``alpaca`` conversation template does); the response follows
    ``### Response:`` directly, as in training.
    """
    from .alpaca import alpaca_prompt

    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    text = alpaca_prompt(users[0])
    for answer, question in zip(answers, users[1:]):
        text += f"{answer}\n\n### Instruction:\n{question}\n\n### Response:"
    return text


class InstructionFamily(TaskFamily):
    name = "instruction"
    kind = "causal"
    tasks = ("instruction",)
    PRESETS = {
        # quick: RunConfig's small defaults. There is no "paper" preset: the KaSA paper's instruction-tuning
        # hyper-parameters are not in the sources available offline.
        "quick": {"instruction": {"max_new_tokens": 128}},  # a CPU-sized answer cap; FastChat answers up to 1024
    }

    def primary_metric(self, config: "RunConfig") -> str:
        return "mt_bench_score" if config.judge_model else "mt_bench_turns_answered"

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
        from ..metrics.e2e import score_e2e
        from ..mt_bench import read_model_answers, run_mt_bench

        questions, references = eval_data["questions"], eval_data["references"]
        model_id = re.sub(r"[^\w.-]+", "_", f"{Path(config.model).name}-{config.method}-s{config.seed}")
        metrics = run_mt_bench(model, tokenizer, questions, out_dir, model_id, judge_model=config.judge_model,
                               data_dir=config.data_dir, max_new_tokens=config.max_new_tokens,
                               batch_size=config.eval_batch_size, seed=config.seed, render=alpaca_conversation)
        answers = read_model_answers(Path(out_dir) / "model_answer" / f"{model_id}.jsonl")
        # Overlap with GPT-4's turn-1 reference answers (math, reasoning, coding only): a sanity number, not MT-Bench.
        pairs = [(answers[q["question_id"]][0], references[q["question_id"]][0]) for q in questions
                 if q["question_id"] in references and answers.get(q["question_id"])]
        if pairs:
            scores = score_e2e([a if a.strip() else "." for a, _ in pairs], [[r] for _, r in pairs], metrics=("BLEU", "ROUGE_L"))
            metrics.update({f"ref_overlap_{k}": v for k, v in scores.items()})
            metrics["ref_overlap_answers"] = float(len(pairs))
        return metrics


FAMILY = InstructionFamily()
