"""Turn-1 MT-Bench grading with a local judge model (kept for callers of ``judge_answers``; see ``mt_bench``).

The prompt follows FastChat's selection (``single-math-v1`` with GPT-4's reference for math/reasoning/coding,
``single-v1`` otherwise) and the ``[[rating]]`` parse with FastChat's fallback; unrated answers are counted, never
guessed.
"""

from __future__ import annotations

from .mt_bench import run_local_judge


def judge_answers(judge_model: str, questions: list[dict], answers: list[str], data_dir: str | None,
                  max_new_tokens: int = 256) -> dict[str, float]:
    """``{"judge_rated", "judge_unrated", "judge_score"}`` for turn-1 ``answers`` (one per question, same order)."""
    by_id = {question["question_id"]: [answer] for question, answer in zip(questions, answers)}
    _, summary = run_local_judge(judge_model, questions, by_id, data_dir, turns=(1,), max_new_tokens=max_new_tokens)
    return {"judge_rated": summary["judge_rated"], "judge_unrated": summary["judge_unrated"],
            "judge_score": summary["mt_bench_score"]}
