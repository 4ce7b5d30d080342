"""MT-Bench as FastChat runs it: decoding settings, two-turn answering, answer files, judge prompts and ratings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kasa_peft.experiments import mt_bench as mb
from kasa_peft.experiments.tasks.common import DataError

_HERE = Path(__file__).resolve()
DATA = next((p for p in (_HERE.parents[2].parent / "shared" / "data", _HERE.parents[4] / "shared" / "data") if p.is_dir()),
            _HERE.parents[2].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "instruction" / "mt_bench").is_dir(), reason="../shared/data is not present")


@pytest.mark.parametrize("category, temperature, sample", [
    ("writing", 0.7, True), ("roleplay", 0.7, True), ("extraction", 0.0, False), ("math", 0.0, False),
    ("coding", 0.0, False), ("reasoning", 0.0, False), ("stem", 0.1, True), ("humanities", 0.1, True),
    ("unknown-category", 0.7, True),
])
def test_fastchat_generation_settings(category, temperature, sample):
    settings = mb.generation_settings(category)
    assert (settings.temperature, settings.do_sample, settings.max_new_tokens) == (temperature, sample, 1024)


def test_greedy_threshold_is_1e_4():
    assert not mb.GenerationSettings(0.99e-4).do_sample and mb.GenerationSettings(1e-4).do_sample


@pytest.mark.parametrize("category, turn, name", [
    ("writing", 1, "single-v1"), ("humanities", 2, "single-v1-multi-turn"), ("math", 1, "single-math-v1"),
    ("reasoning", 1, "single-math-v1"), ("coding", 2, "single-math-v1-multi-turn"), ("extraction", 1, "single-v1"),
])
def test_judge_prompt_selection(category, turn, name):
    assert mb.judge_prompt_name(category, turn) == name


def test_judge_prompt_selection_rejects_turn_3():
    with pytest.raises(ValueError, match="turns 1 and 2"):
        mb.judge_prompt_name("writing", 3)


_QUESTION = {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]}
_ANSWERS = ["It is 4.", "It is 6."]
_REFERENCE = ["4", "6"]


@needs_data
def test_math_turn1_prompt_is_filled_as_fastchat_fills_it():
    prompts = mb.load_judge_prompts(DATA)
    system, user = mb.render_judge_prompt(prompts["single-math-v1"], _QUESTION, _ANSWERS, _REFERENCE, turn=1)
    assert system == "You are a helpful assistant."
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert user.endswith("[Question]\nWhat is 2+2?\n\n[The Start of Reference Answer]\n4\n[The End of Reference Answer]\n\n"
                         "[The Start of Assistant's Answer]\nIt is 4.\n[The End of Assistant's Answer]")
    assert "And 3+3?" not in user and "It is 6." not in user


@needs_data
def test_math_turn2_prompt_carries_both_turns_and_both_references():
    prompts = mb.load_judge_prompts(DATA)
    system, user = mb.render_judge_prompt(prompts["single-math-v1-multi-turn"], _QUESTION, _ANSWERS, _REFERENCE, turn=2)
    assert "focus on the assistant's answer to the second question" in system
    assert user == ("<|The Start of Reference Answer|>\n\n### User:\nWhat is 2+2?\n\n### Reference answer:\n4\n\n"
                    "### User:\nAnd 3+3?\n\n### Reference answer:\n6\n\n<|The End of Reference Answer|>\n\n\n"
                    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\nWhat is 2+2?\n\n### Assistant A:\n"
                    "It is 4.\n\n### User:\nAnd 3+3?\n\n### Assistant A:\nIt is 6.\n\n"
                    "<|The End of Assistant A's Conversation with User|>")


@needs_data
def test_requests_for_the_real_questions_use_references_exactly_for_math_reasoning_coding():
    from kasa_peft.experiments.tasks.instruction import load_mt_bench_questions, load_mt_bench_references

    questions, references = load_mt_bench_questions(DATA), load_mt_bench_references(DATA)
    answers = {q["question_id"]: ["first answer", "second answer"] for q in questions}
    requests = mb.judge_requests(questions, answers, references, mb.load_judge_prompts(DATA))
    assert len(requests) == 160
    by_category = {q["question_id"]: q["category"] for q in questions}
    for request in requests:
        math = by_category[request.question_id] in ("math", "reasoning", "coding")
        assert ("Reference" in request.user_prompt) == math
        assert request.prompt_name == mb.JUDGE_PROMPT_NAMES[(math, request.turn == 2)]
        if math:
            assert references[request.question_id][request.turn - 1] in request.user_prompt
    writing = next(r for r in requests if by_category[r.question_id] == "writing" and r.turn == 1)
    assert "[The Start of Assistant's Answer]\nfirst answer\n" in writing.user_prompt and "second answer" not in writing.user_prompt
    with pytest.raises(DataError, match="needs GPT-4's reference answer"):
        mb.judge_requests(questions, answers, {}, mb.load_judge_prompts(DATA))
    only_turn_1 = mb.judge_requests(questions, answers, references, mb.load_judge_prompts(DATA), turns=(1,))
    assert {r.turn for r in only_turn_1} == {1} and len(only_turn_1) == 80


def test_missing_judge_prompt_is_named(tmp_path):
    (tmp_path / "instruction" / "mt_bench").mkdir(parents=True)
    (tmp_path / "instruction" / "mt_bench" / "judge_prompts.jsonl").write_text(
        json.dumps({"name": "single-v1", "system_prompt": "s", "prompt_template": "t"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="single-math-v1"):
        mb.load_judge_prompts(tmp_path)


@pytest.mark.parametrize("judgment, rating", [
    ("The answer is right. Rating: [[7]]", 7.0), ("Rating: [[8.5]]", 8.5), ("Rating: [6]", 6.0),
    ("see [3] for why. Rating: [[9]]", 9.0),  # the double-bracket verdict wins over an earlier [x]
    ("I cannot rate this.", None), ("Rating: 7/10", None),
])
def test_rating_parse_with_fastchats_fallback(judgment, rating):
    assert mb.parse_rating(judgment) == rating


def test_summary_excludes_unrated_judgments():
    records = [{"turn": 1, "score": 8.0}, {"turn": 1, "score": None}, {"turn": 2, "score": 4.0}, {"turn": 2, "score": 6.0}]
    summary = mb.summarize_judgments(records)
    assert summary == {"mt_bench_score": 6.0, "judge_rated": 3.0, "judge_unrated": 1.0, "mt_bench_turn1": 8.0, "mt_bench_turn2": 5.0}


def test_answer_file_has_fastchats_model_answer_layout(tmp_path):
    questions = [{"question_id": 82, "category": "writing", "turns": ["a", "b"]},
                 {"question_id": 81, "category": "writing", "turns": ["c", "d"]}]
    path = mb.write_model_answers(tmp_path / "model_answer" / "kasa.jsonl", questions, [["a1", "a2"], ["c1", "c2"]], "kasa")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["question_id"] for r in records] == [81, 82]  # sorted, as FastChat's reorg_answer_file leaves it
    for record in records:
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "kasa" and isinstance(record["answer_id"], str) and isinstance(record["tstamp"], float)
    assert records[0]["choices"] == [{"index": 0, "turns": ["c1", "c2"]}]
    assert mb.read_model_answers(path) == {81: ["c1", "c2"], 82: ["a1", "a2"]}


def test_bad_answer_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 81}\n', encoding="utf-8")
    with pytest.raises(DataError, match="choices"):
        mb.read_model_answers(path)


@pytest.fixture(scope="module")
def tiny_chat_model():
    from kasa_peft.experiments.models import load_model

    loaded = load_model("tiny-llama", "causal")
    loaded.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    return loaded


def test_two_turn_answering_feeds_turn_1_answer_into_turn_2(tiny_chat_model):
    model, tokenizer = tiny_chat_model.model, tiny_chat_model.tokenizer
    questions = [{"question_id": 1, "category": "math", "turns": ["what is two plus two", "and three plus three"]},
                 {"question_id": 2, "category": "extraction", "turns": ["name the city", "name the country"]}]
    seen: list[list[dict]] = []

    def render(messages):
        seen.append(messages)
        return mb.chat_prompt(tokenizer, messages)

    answers = mb.answer_questions(model, tokenizer, questions, max_new_tokens=5, batch_size=2, render=render,
                                  show_progress=False)
    assert [len(a) for a in answers] == [2, 2]
    turn2 = [m for m in seen if len(m) == 3]
    assert turn2[0] == [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": answers[0][0]},
                        {"role": "user", "content": "and three plus three"}]
    # greedy (temperature 0 categories): each batched, left-padded answer equals an unbatched greedy decode
    for question, answer in zip(questions, answers):
        prompt = mb.chat_prompt(tokenizer, mb.conversation(question["turns"], []))
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        assert answer[0] == tokenizer.decode(out, skip_special_tokens=True).strip()


def test_answering_passes_fastchats_sampling_per_category(tiny_chat_model, monkeypatch):
    model, tokenizer = tiny_chat_model.model, tiny_chat_model.tokenizer
    calls = []
    original = model.generate

    def recording_generate(**kwargs):
        calls.append({k: kwargs.get(k) for k in ("do_sample", "temperature", "max_new_tokens")} | {"rows": kwargs["input_ids"].shape[0]})
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    questions = [{"question_id": 1, "category": "writing", "turns": ["write a poem", "shorter"]},
                 {"question_id": 2, "category": "math", "turns": ["add one and one"]}]
    answers = mb.answer_questions(model, tokenizer, questions, max_new_tokens=3, show_progress=False)
    assert [len(a) for a in answers] == [2, 1]
    assert {"do_sample": True, "temperature": 0.7, "max_new_tokens": 3, "rows": 1} in calls
    assert {"do_sample": False, "temperature": None, "max_new_tokens": 3, "rows": 1} in calls
    assert len(calls) == 3  # writing turn 1, math turn 1, writing turn 2


def test_local_judge_records_on_a_tiny_model(tiny_chat_model):
    requests = [mb.JudgeRequest(81, 1, "single-v1", "You are a helpful assistant.", "rate this")]
    records = mb.judge_with_local_model(tiny_chat_model.model, tiny_chat_model.tokenizer, requests, "tiny-judge", "kasa",
                                        max_new_tokens=4, show_progress=False)
    assert records[0]["judge"] == ["tiny-judge", "single-v1"] and records[0]["turn"] == 1
    assert records[0]["score"] == mb.parse_rating(records[0]["judgment"])


@needs_data
@pytest.mark.slow
def test_judge_answers_keeps_its_interface():
    from kasa_peft.experiments.judge import judge_answers
    from kasa_peft.experiments.tasks.instruction import load_mt_bench_questions

    questions = [q for q in load_mt_bench_questions(DATA) if q["question_id"] in (81, 111)]  # writing and math
    metrics = judge_answers("tiny-llama", questions, ["an answer", "another answer"], str(DATA), max_new_tokens=3)
    assert set(metrics) == {"judge_rated", "judge_unrated", "judge_score"}
    assert metrics["judge_rated"] + metrics["judge_unrated"] == 2


def test_run_mt_bench_without_judge_writes_answers_and_counts_only(tiny_chat_model, tmp_path):
    questions = [{"question_id": 81, "category": "writing", "turns": ["write", "again"]}]
    metrics = mb.run_mt_bench(tiny_chat_model.model, tiny_chat_model.tokenizer, questions, tmp_path, "kasa-tiny",
                              max_new_tokens=2)
    assert metrics == {"mt_bench_questions_answered": 1.0, "mt_bench_turns_answered": 2.0}  # no score without a judge
    assert list(mb.read_model_answers(tmp_path / "model_answer" / "kasa-tiny.jsonl")) == [81]


@needs_data
@pytest.mark.slow
def test_run_mt_bench_with_a_local_judge_writes_judgments(tiny_chat_model, tmp_path):
    from kasa_peft.experiments.tasks.instruction import load_mt_bench_questions

    questions = [q for q in load_mt_bench_questions(DATA) if q["question_id"] in (81, 111)]
    metrics = mb.run_mt_bench(tiny_chat_model.model, tiny_chat_model.tokenizer, questions, tmp_path, "kasa-tiny",
                              judge_model="tiny-llama", data_dir=DATA, max_new_tokens=2, judge_max_new_tokens=3)
    assert metrics["judge_rated"] + metrics["judge_unrated"] == 4  # 2 questions × 2 turns
    lines = (tmp_path / "model_judgment" / "tiny-llama_single.jsonl").read_text(encoding="utf-8").splitlines()
    judged = [json.loads(line) for line in lines]
    assert sorted((r["question_id"], r["turn"], r["judge"][1]) for r in judged) == [
        (81, 1, "single-v1"), (81, 2, "single-v1-multi-turn"), (111, 1, "single-math-v1"), (111, 2, "single-math-v1-multi-turn")]
    # FastChat's file convention: the parsed rating, or -1 where the judgment has none
    assert all(r["score"] == (mb.parse_rating(r["judgment"]) if mb.parse_rating(r["judgment"]) is not None else -1) for r in judged)
