"""MT-Bench (Zheng et al., 2023) as FastChat's ``llm_judge`` runs it: two-turn answers, answer files, single grading.

Answering (``fastchat/llm_judge/gen_model_answer.py``): every question's turns are answered in order; turn ``k`` sees
the earlier questions and the model's own earlier answers through the model's chat template. The sampling
temperature depends on the category (``TEMPERATURE_BY_CATEGORY``, FastChat's ``temperature_config``; 0.7 for an
unknown category); below ``1e-4`` decoding is greedy; at most 1024 new tokens. Answers are cut at the first end-of-turn
token, special tokens dropped, whitespace stripped.

Answer file: FastChat's ``model_answer/<model_id>.jsonl`` layout, one line per question, sorted by id::

    {"question_id": 81, "answer_id": "...", "model_id": "...", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp": ...}

Grading (``gen_judgment.py`` ``--mode single``): turn 1 of a question in ``NEED_REF_CATS`` (math, reasoning, coding)
is judged with ``single-math-v1`` and GPT-4's reference answer, other turn-1s with ``single-v1``; turn 2 with
``single-math-v1-multi-turn`` / ``single-v1-multi-turn`` (the whole conversation; both reference turns for math).
The rating is ``[[x]]`` in the judge's output, else FastChat's fallback ``[x]``; a judgment without either scores
-1 in FastChat and is left out of the means (here: ``score`` None, counted in ``judge_unrated``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kasa_peft.checkpoint import atomic_write_text

from .generation import progress_bar
from .tasks.common import DataError, require_file, resolve_data_dir

# fastchat/llm_judge/common.py
TEMPERATURE_BY_CATEGORY = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                           "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
GREEDY_BELOW = 1e-4
MAX_NEW_TOKENS = 1024
NEED_REF_CATS = ("math", "reasoning", "coding")
JUDGE_PROMPT_NAMES = {  # (needs a reference, multi-turn) → judge_prompts.jsonl name
    (False, False): "single-v1", (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn",
}
JUDGE_MAX_NEW_TOKENS = 2048  # FastChat asks its API judges for up to 2048 tokens at temperature 0
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float
    max_new_tokens: int = MAX_NEW_TOKENS

    @property
    def do_sample(self) -> bool:
        return self.temperature >= GREEDY_BELOW


def generation_settings(category: str, max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationSettings:
    """FastChat's decoding for a question of ``category``."""
    return GenerationSettings(TEMPERATURE_BY_CATEGORY.get(category, DEFAULT_TEMPERATURE), max_new_tokens)


# ---------------------------------------------------------------------------------------------------------- answering


def chat_prompt(tokenizer, messages: Messages) -> str:
    """The tokenizer's chat template with a generation prompt; plain ``User:/Assistant:`` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant' if m['role'] == 'assistant' else 'System'}: {m['content']}"
             for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def conversation(question_turns: Sequence[str], answers: Sequence[str]) -> Messages:
    """Messages for the next turn: every earlier question with the model's answer, then the next question."""
    messages: Messages = []
    for asked, answered in zip(question_turns, answers):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question_turns[len(answers)]})
    return messages


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, stop_ids: list[int]) -> list[str]:
    """Continuations of ``prompts`` (one left-padded batch), cut at the first stop token."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # add_special_tokens=False: a chat template already writes the special tokens it wants.
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    # As FastChat: only do_sample and temperature are set; other sampling knobs stay the model's generation defaults.
    sampling = {"do_sample": True, "temperature": settings.temperature} if settings.do_sample else {"do_sample": False}
    generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=settings.max_new_tokens,
                               eos_token_id=stop_ids, pad_token_id=pad_id, num_beams=1, **sampling)
    texts = []
    for row in generated[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return texts


def answer_questions(
    model,
    tokenizer,
    questions: Sequence[dict],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    render: Callable[[Messages], str] | None = None,
    show_progress: bool = True,
) -> list[list[str]]:
    """Answers to every turn of every question (``[[turn 1, turn 2], …]``) with FastChat's settings.

    Turns are answered breadth-first (all turn 1s, then all turn 2s) in batches of questions with the same
    temperature; greedy answers equal FastChat's one-at-a-time loop, sampled ones match it in distribution
    (``torch.manual_seed(seed)`` once at the start, where FastChat seeds each question). ``render`` turns messages
    into the prompt text (default: ``chat_prompt`` with the tokenizer's template).
    """
    render = render or (lambda messages: chat_prompt(tokenizer, messages))
    stop_ids = _stop_ids(model, tokenizer)
    if not stop_ids:
        raise DataError("MT-Bench answering needs an end-of-sequence token: the tokenizer has no eos_token")
    answers: list[list[str]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    total = sum(len(q["turns"]) for q in questions)
    try:
        with progress_bar("MT-Bench answers", total, disable=not show_progress) as progress:
            bar = progress.add_task("MT-Bench answers", total=total)
            for turn in range(max((len(q["turns"]) for q in questions), default=0)):
                pending: dict[GenerationSettings, list[int]] = {}
                for index, question in enumerate(questions):
                    if turn < len(question["turns"]):
                        pending.setdefault(generation_settings(question["category"], max_new_tokens), []).append(index)
                for settings, indices in pending.items():
                    for start in range(0, len(indices), batch_size):
                        chunk = indices[start : start + batch_size]
                        prompts = [render(conversation(questions[i]["turns"], answers[i])) for i in chunk]
                        for i, text in zip(chunk, _generate(model, tokenizer, prompts, settings, stop_ids)):
                            answers[i].append(text)
                        progress.advance(bar, len(chunk))
    finally:
        model.train(was_training)
    return answers


def answer_records(questions: Sequence[dict], answers: Sequence[Sequence[str]], model_id: str) -> list[dict]:
    """FastChat ``model_answer`` records, sorted by question id (FastChat's ``reorg_answer_file``)."""
    records = [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}
               for q, turns in zip(questions, answers)]
    return sorted(records, key=lambda record: record["question_id"])


def write_model_answers(path: str | Path, questions: Sequence[dict], answers: Sequence[Sequence[str]], model_id: str) -> Path:
    """Write ``answers`` as FastChat's ``model_answer`` JSONL (atomically); FastChat can judge the file elsewhere."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answer_records(questions, answers, model_id)))
    return path


def _read_jsonl(path: Path, what: str) -> list[dict]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path}: binary data; expected {what} (JSON lines)")
    records = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg}); expected {what}") from None
    return records


def read_model_answers(path: str | Path) -> dict[int, list[str]]:
    """``question_id → turns`` of a FastChat ``model_answer`` file (first choice)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MT-Bench answer file not found: {path}")
    answers = {}
    for number, record in enumerate(_read_jsonl(path, "FastChat model_answer records"), start=1):
        try:
            answers[record["question_id"]] = list(record["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: record {number} lacks question_id or choices[0].turns (FastChat model_answer layout)") from None
    return answers


# ------------------------------------------------------------------------------------------------------------ judging


def load_judge_prompts(data_dir=None) -> dict[str, dict]:
    """FastChat's judge prompts by name, with the four single-answer prompts checked present."""
    path = require_file(resolve_data_dir(data_dir), "instruction/mt_bench/judge_prompts.jsonl", "MT-Bench judge prompts")
    prompts = {record.get("name"): record for record in _read_jsonl(path, "FastChat judge prompts")}
    missing = [name for name in JUDGE_PROMPT_NAMES.values() if name not in prompts]
    if missing:
        raise DataError(f"{path}: lacks judge prompts {missing} (FastChat's fastchat/llm_judge/data/judge_prompts.jsonl has them)")
    return prompts


def judge_prompt_name(category: str, turn: int) -> str:
    """The FastChat prompt that grades ``turn`` (1 or 2) of a question in ``category``."""
    if turn not in (1, 2):
        raise ValueError(f"MT-Bench questions have turns 1 and 2, got {turn}")
    return JUDGE_PROMPT_NAMES[(category in NEED_REF_CATS, turn == 2)]


@dataclass(frozen=True)
class JudgeRequest:
    question_id: int
    turn: int
    prompt_name: str
    system_prompt: str
    user_prompt: str


def render_judge_prompt(template: dict, question: dict, answer_turns: Sequence[str],
                        reference_turns: Sequence[str] | None, turn: int) -> tuple[str, str]:
    """``(system prompt, user prompt)`` filled as FastChat's ``run_judge_single`` fills them."""
    kwargs = {}
    if reference_turns is not None:
        kwargs["ref_answer_1"] = reference_turns[0]
        if turn == 2:
            kwargs["ref_answer_2"] = reference_turns[1]
    if turn == 2:
        user = template["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                  answer_1=answer_turns[0], answer_2=answer_turns[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=answer_turns[0], **kwargs)
    return template["system_prompt"], user


def judge_requests(questions: Sequence[dict], answers: dict[int, Sequence[str]], references: dict[int, Sequence[str]],
                   prompts: dict[str, dict], turns: Sequence[int] = (1, 2)) -> list[JudgeRequest]:
    """One request per (question, turn) that has an answer; math/reasoning/coding need GPT-4's reference answer."""
    requests = []
    for question in questions:
        qid, given = question["question_id"], answers.get(question["question_id"])
        for turn in turns:
            if given is None or len(given) < turn or len(question["turns"]) < turn:
                continue
            name = judge_prompt_name(question["category"], turn)
            reference = None
            if question["category"] in NEED_REF_CATS:
                reference = references.get(qid)
                if reference is None or len(reference) < turn:
                    raise DataError(f"MT-Bench question {qid} ({question['category']}) needs GPT-4's reference answer for "
                                    f"turn {turn}; instruction/mt_bench/gpt-4.jsonl lacks it")
            system, user = render_judge_prompt(prompts[name], question, given, reference, turn)
            requests.append(JudgeRequest(qid, turn, name, system, user))
    return requests


def parse_rating(judgment: str) -> float | None:
    """The ``[[x]]`` rating of a judgment (else FastChat's fallback ``[x]``); None where neither occurs."""
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    return float(match.group(1)) if match else None


def judge_chat_prompt(tokenizer, system_prompt: str, user_prompt: str) -> str:
    """The judge's input: system + user message through its chat template (system folded in where unsupported)."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - some templates refuse a system role
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{user_prompt}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return chat_prompt(tokenizer, messages)


def judge_with_local_model(model, tokenizer, requests: Sequence[JudgeRequest], judge_id: str, model_id: str,
                           max_new_tokens: int = JUDGE_MAX_NEW_TOKENS, batch_size: int = 4,
                           show_progress: bool = True) -> list[dict]:
    """Greedy judgments (FastChat judges at temperature 0) as FastChat ``model_judgment`` single records."""
    stop_ids = _stop_ids(model, tokenizer)
    settings = GenerationSettings(0.0, max_new_tokens)
    records = []
    model.eval()
    with progress_bar("MT-Bench judging", len(requests), disable=not show_progress) as progress:
        bar = progress.add_task("MT-Bench judging", total=len(requests))
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            prompts = [judge_chat_prompt(tokenizer, r.system_prompt, r.user_prompt) for r in chunk]
            for request, judgment in zip(chunk, _generate(model, tokenizer, prompts, settings, stop_ids)):
                records.append({"question_id": request.question_id, "model": model_id,
                                "judge": [judge_id, request.prompt_name], "user_prompt": request.user_prompt,
                                "judgment": judgment, "score": parse_rating(judgment), "turn": request.turn,
                                "tstamp": time.time()})
            progress.advance(bar, len(chunk))
    return records


def summarize_judgments(records: Sequence[dict]) -> dict[str, float]:
    """FastChat's ``show_result`` single-mode numbers: mean rating per turn and over both; unrated ones excluded."""
    rated = [r for r in records if r["score"] is not None]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    summary = {"mt_bench_score": mean([r["score"] for r in rated]), "judge_rated": float(len(rated)),
               "judge_unrated": float(len(records) - len(rated))}
    for turn in sorted({r["turn"] for r in records}):
        summary[f"mt_bench_turn{turn}"] = mean([r["score"] for r in rated if r["turn"] == turn])
    return summary


def write_judgments(path: str | Path, records: Sequence[dict]) -> Path:
    """FastChat ``model_judgment`` JSONL (score -1 where unrated, as FastChat writes it)."""
    path = Path(path)
    lines = [json.dumps({**r, "score": -1 if r["score"] is None else r["score"]}, ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))
    return path


def run_local_judge(judge_model: str, questions: Sequence[dict], answers: dict[int, Sequence[str]], data_dir=None,
                    model_id: str = "model", turns: Sequence[int] = (1, 2), max_new_tokens: int = JUDGE_MAX_NEW_TOKENS,
                    batch_size: int = 4) -> tuple[list[dict], dict[str, float]]:
    """Grade ``answers`` (``question_id → turns``) with a local judge model: FastChat records and their summary."""
    from .models import load_model
    from .tasks.instruction import load_mt_bench_references

    prompts = load_judge_prompts(data_dir)
    requests = judge_requests(questions, answers, load_mt_bench_references(data_dir), prompts, turns)
    judge = load_model(judge_model, "causal")
    records = judge_with_local_model(judge.model, judge.tokenizer, requests, judge_model, model_id,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
    return records, summarize_judgments(records)


def run_mt_bench(model, tokenizer, questions: Sequence[dict], out_dir: str | Path, model_id: str,
                 judge_model: str | None = None, data_dir=None, max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 8, seed: int = 0, judge_max_new_tokens: int = JUDGE_MAX_NEW_TOKENS,
                 render: Callable[[Messages], str] | None = None) -> dict[str, float]:
    """Answer both turns, write ``out_dir/model_answer/<model_id>.jsonl``; with ``judge_model`` also grade them.

    Without a judge the metrics are counts only: nothing here is an MT-Bench score until a judge has rated it.
    With one, ``out_dir/model_judgment/<judge>_single.jsonl`` holds FastChat judgment records and the metrics add
    ``mt_bench_score`` (both turns), ``mt_bench_turn1``/``mt_bench_turn2`` and the rated/unrated counts.
    """
    out_dir = Path(out_dir)
    answers = answer_questions(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               seed=seed, render=render)
    write_model_answers(out_dir / "model_answer" / f"{model_id}.jsonl", questions, answers, model_id)
    metrics = {"mt_bench_questions_answered": float(len(questions)),
               "mt_bench_turns_answered": float(sum(len(turns) for turns in answers))}
    if judge_model:
        by_id = {question["question_id"]: turns for question, turns in zip(questions, answers)}
        records, summary = run_local_judge(judge_model, questions, by_id, data_dir, model_id,
                                           max_new_tokens=judge_max_new_tokens)
        write_judgments(out_dir / "model_judgment" / f"{Path(judge_model).name}_single.jsonl", records)
        metrics.update(summary)
    return metrics
