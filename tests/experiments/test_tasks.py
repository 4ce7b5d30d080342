"""Task loaders on tiny slices of the real files (../shared/data) and on deliberately broken files."""

from __future__ import annotations


import pytest

from kasa_peft.experiments.tasks import commonsense as cs
from kasa_peft.experiments.tasks import e2e, glue, instruction
from kasa_peft.experiments.tasks.common import DataError

from _paths import DATA  # noqa: E402  (tests/experiments is on sys.path under pytest)
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


def test_demo_sst2_ships_with_the_package():
    train, dev = glue.load_demo_sst2("train"), glue.load_demo_sst2("validation")
    assert (len(train), len(dev)) == (2000, 500)
    assert {x["label"] for x in train} == {0, 1} and all(x["sentence2"] is None for x in dev)


@needs_data
@pytest.mark.parametrize("task, n_dev, pair", [("cola", 527 + 516, False), ("sst2", 872, False), ("mrpc", 408, True),
                                               ("stsb", 1500, True), ("rte", 277, True)])
def test_glue_dev_sizes_and_fields(task, n_dev, pair):
    dev = glue.load_glue(task, "validation", DATA)
    assert len(dev) == n_dev
    assert (dev[0]["sentence2"] is not None) == pair
    if task == "stsb":
        assert all(0.0 <= x["label"] <= 5.0 for x in dev)
    else:
        assert {x["label"] for x in dev} == {0, 1}


@needs_data
def test_rte_keeps_the_hf_label_convention():
    first = glue.load_glue("rte", "validation", DATA, limit=1)[0]
    assert first["label"] == 1  # "Weapons of Mass Destruction" pair: not_entailment in the HF export
    assert glue.GLUE_TASKS["rte"].label_names[first["label"]] == "not_entailment"


@needs_data
def test_qnli_dev_split_is_disjoint_and_deterministic():
    train, dev = glue.load_glue("qnli", "train", DATA), glue.load_glue("qnli", "validation", DATA)
    assert len(train) + len(dev) == 5463 and len(train) == int(0.8 * 5463)
    key = lambda x: (x["sentence1"], x["sentence2"])
    assert not {key(x) for x in train} & {key(x) for x in dev}
    assert glue.load_glue("qnli", "train", DATA, limit=5) == train[:5]


def test_e2e_reference_file_format(tmp_path):
    e2e.write_e2e_reference_file([["a .", "b ."], ["c ."]], tmp_path / "refs.txt")
    assert (tmp_path / "refs.txt").read_text() == "a .\nb .\n\nc .\n"


@needs_data
def test_commonsense_tasks_and_hellaswag_conversion():
    for task in cs.COMMONSENSE_TASKS:
        items = cs.load_commonsense(task, "test", DATA, limit=3)
        assert len(items) == 3 and all(cs.extract_answer(task, item["output"]) == item["answer"] for item in items)
    hellaswag = cs.load_commonsense("hellaswag", "test", DATA)
    assert len(hellaswag) == 10042
    assert hellaswag[0]["instruction"].count("Ending") == 4 and hellaswag[0]["answer"] == "ending4"
    siqa = cs.load_commonsense("social_i_qa", "train", DATA, limit=2)
    assert siqa[0]["answer"] == "answer1" and "Answer3:" in siqa[0]["instruction"]
    mix = cs.build_commonsense_training_mix(DATA, per_task_limit=2)
    assert len(mix) == 2 * len(cs.TRAINING_MIX_TASKS)


@pytest.mark.parametrize(
    "task, text, expected",
    [("boolq", "the correct answer is true", "true"), ("ARC-Easy", "answer2 ... answer3", "answer2"),
     ("piqa", "I think solution2", "solution2"), ("winogrande", "no idea", ""), ("hellaswag", "ending4.", "ending4")],
)
def test_answer_extraction(task, text, expected):
    assert cs.extract_answer(task, text) == expected


def test_commonsense_prompt_template():
    prompt = cs.generate_prompt("Pick one.")
    assert prompt.startswith("Below is an instruction that describes a task.") and prompt.endswith("### Response:\n")
    assert "### Input:\nctx" in cs.generate_prompt("Pick one.", "ctx")


@needs_data
def test_mt_bench():
    questions = instruction.load_mt_bench_questions(DATA)
    references = instruction.load_mt_bench_references(DATA)
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert set(references) <= {q["question_id"] for q in questions}


def test_instruction_file_formats(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    records = instruction.load_instruction_file(path)
    assert records[0]["messages"][1] == {"role": "assistant", "content": "hi"} and len(records) == 2


# ------------------------------------------------------------------ bad data: one clear line naming file and fix
def test_missing_file_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*SST-2/train_full.tsv; pass --data-dir"):
        glue.load_glue("sst2", "train", tmp_path)


def test_garbled_row_names_file_and_line(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nno label column\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: expected label"):
        glue.load_glue("sst2", "validation", tmp_path)


def test_label_outside_the_task_set(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nodd\t7\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: label 7 is outside the task's label set \[0, 1\]"):
        glue.load_glue("sst2", "validation", tmp_path)


def test_commonsense_answer_outside_the_set(tmp_path):
    (tmp_path / "commonsense" / "piqa").mkdir(parents=True)
    (tmp_path / "commonsense" / "piqa" / "test.json").write_text('[{"instruction": "q", "answer": "solution3"}]')
    with pytest.raises(DataError, match="solution3"):
        cs.load_commonsense("piqa", "test", tmp_path)
