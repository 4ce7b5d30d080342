"""Optional MT-Bench single-answer grading with a local judge model (no judge is reachable offline by default).

Uses FastChat's ``single-v1`` judge prompt (from ``instruction/mt_bench/judge_prompts.jsonl``) and parses the
``[[rating]]`` verdict, 1–10. The judge is any local causal LM directory; answers it does not rate are counted,
never guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .generation import generate_texts
from .models import load_model

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def _judge_prompt(data_dir: str | None) -> dict:
    from .tasks.common import DataError, resolve_data_dir

    root = resolve_data_dir(data_dir)
    path = Path(root or ".") / "instruction" / "mt_bench" / "judge_prompts.jsonl"
    if not path.is_file():
        raise DataError(f"judge prompts not found: {path}; pass --data-dir with instruction/mt_bench/judge_prompts.jsonl")
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("name") == "single-v1":
            return record
    raise DataError(f"{path} has no 'single-v1' judge prompt")


def judge_answers(judge_model: str, questions: list[dict], answers: list[str], data_dir: str | None) -> dict[str, float]:
    prompt = _judge_prompt(data_dir)
    judge = load_model(judge_model, "causal")
    requests = []
    for question, answer in zip(questions, answers):
        user = prompt["prompt_template"].format(question=question["turns"][0], answer=answer)
        messages = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]
        if getattr(judge.tokenizer, "chat_template", None):
            requests.append(judge.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            requests.append(prompt["system_prompt"] + "\n\n" + user + "\n\nRating:")
    verdicts = generate_texts(judge.model, judge.tokenizer, requests, batch_size=4, max_new_tokens=256, description="judging")
    ratings = [float(m.group(1)) for m in (_RATING.search(v) for v in verdicts) if m]
    return {"judge_rated": float(len(ratings)), "judge_score": sum(ratings) / len(ratings) if ratings else float("nan")}
