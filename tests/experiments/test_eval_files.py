"""--eval-file readers: every GLUE dev-file layout against the task loaders, E2E references in both layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasa_peft.experiments import eval_files as ef
from kasa_peft.experiments.tasks import glue
from kasa_peft.experiments.tasks.common import DataError
from kasa_peft.experiments.tasks.e2e_lora_format import csv_to_lora_lines

_HERE = Path(__file__).resolve()
DATA = next((p for p in (_HERE.parents[2].parent / "shared" / "data", _HERE.parents[4] / "shared" / "data") if p.is_dir()),
            _HERE.parents[2].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="../shared/data is not present")


@needs_data
@pytest.mark.parametrize("task, relative", [("sst2", "SST-2/dev.tsv"), ("mrpc", "MRPC/dev.tsv"), ("stsb", "STS-B/dev.tsv"),
                                            ("rte", "RTE/dev.tsv")])
def test_dev_files_give_the_task_loaders_examples(task, relative):
    assert ef.load_glue_eval_file(task, DATA / "glue" / relative) == glue.load_glue(task, "validation", DATA)


@needs_data
def test_cola_dev_files_concatenate_to_the_loaders_validation_split():
    cola = DATA / "glue" / "CoLA"
    both = ef.load_glue_eval_file("cola", cola / "in_domain_dev.tsv") + ef.load_glue_eval_file("cola", cola / "out_of_domain_dev.tsv")
    assert both == glue.load_glue("cola", "validation", DATA)


@needs_data
def test_original_sts_layout_matches_the_glue_layout():
    original = ef.load_glue_eval_file("stsb", DATA / "glue" / "STS-B" / "original" / "sts-dev.tsv")
    glue_layout = ef.load_glue_eval_file("stsb", DATA / "glue" / "STS-B" / "dev.tsv")
    assert len(original) == len(glue_layout) == 1500
    assert [x["label"] for x in original] == [x["label"] for x in glue_layout]
    # GLUE's copy repaired the quotes of 7 sentence pairs; every other pair is identical.
    assert sum(a != b for a, b in zip(original, glue_layout)) == 7


@needs_data
def test_msr_paraphrase_file_and_qnli_dev():
    mrpc = ef.load_glue_eval_file("mrpc", DATA / "glue" / "MRPC" / "msr_paraphrase_train.txt")
    assert len(mrpc) == 4076 and {x["label"] for x in mrpc} == {0, 1}
    qnli = ef.load_glue_eval_file("qnli", DATA / "glue" / "QNLI" / "dev.tsv")
    split = glue.load_glue("qnli", "train", DATA) + glue.load_glue("qnli", "validation", DATA)
    key = lambda x: (x["sentence1"], x["sentence2"], x["label"])  # noqa: E731
    assert sorted(map(key, qnli)) == sorted(map(key, split))


def test_glue_original_rte_layout_with_label_names(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text('index\tsentence1\tsentence2\tlabel\n0\tA "quoted" premise.\tA hypothesis.\tnot_entailment\n'
                    "1\tP.\tH.\tentailment\n", encoding="utf-8")
    assert ef.load_glue_eval_file("rte", path) == [
        {"sentence1": 'A "quoted" premise.', "sentence2": "A hypothesis.", "label": 1},
        {"sentence1": "P.", "sentence2": "H.", "label": 0}]


@pytest.mark.parametrize("task, content, message", [
    ("sst2", "index\tsentence\n0\tunlabelled test row\n", "sentence<TAB>label"),  # GLUE test layout
    ("sst2", "index\tquestion\tsentence\tlabel\n0\tq\ts\tentailment\n", "sentence<TAB>label"),  # a QNLI file
    ("mrpc", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n", "Quality"),
    ("stsb", "a\tb\tc\n", "genre, file, year, id, score"),
    ("cola", "index\tsentence\n0\tx\n", "source, label"),
    ("rte", "sentence1\tsentence2\tlabel\tidx\nx\ty\t-1\t0\n", "unlabelled GLUE test file"),
    ("stsb", "genre\tfile\tyear\tid\tscore\ts1\ts2\n", "not a labelled stsb file"),
    ("sst2", "", "empty"),
    ("sst2", "sentence\tlabel\n", "no examples"),
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t2\t3\tonly four\n", "found 4"),
])
def test_wrong_layouts_are_one_line_errors_naming_file_and_columns(tmp_path, task, content, message):
    path = tmp_path / "eval.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        ef.load_glue_eval_file(task, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [(b"PK\x03\x04\x00\x00zip", "binary"), (b"\xff\xfe\xfd\n", "not UTF-8")])
def test_binary_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    for load in (lambda: ef.load_glue_eval_file("sst2", path), lambda: ef.load_e2e_eval_file(path)):
        with pytest.raises(DataError, match=message) as info:
            load()
        assert str(path) in str(info.value)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown GLUE task"):
        ef.load_glue_eval_file("mnli", tmp_path / "x.tsv")
    with pytest.raises(DataError, match="not found"):
        ef.load_glue_eval_file("sst2", tmp_path / "x.tsv")


def _refs_csv(tmp_path: Path) -> Path:
    path = tmp_path / "testset_w_refs.csv"
    path.write_text('mr,ref\n"name[Aromi], eatType[pub]",Aromi is a pub.\n"name[Blue Spice], area[riverside]",'
                    '"Blue Spice is by the river, it is nice."\n"name[Aromi], eatType[pub]",A pub: Aromi.\n', encoding="utf-8")
    return path


def test_e2e_csv_and_lora_layouts_give_the_same_groups(tmp_path):
    csv_path = _refs_csv(tmp_path)
    from_csv = ef.load_e2e_eval_file(csv_path)
    assert from_csv == [("name : Aromi | Type : pub", ["Aromi is a pub .", "A pub : Aromi ."]),
                        ("name : Blue Spice | area : riverside", ["Blue Spice is by the river , it is nice ."])]
    lora = tmp_path / "test.txt"
    lora.write_text("".join(line + "\n" for line in csv_to_lora_lines(csv_path)), encoding="utf-8")
    assert ef.load_e2e_eval_file(lora) == from_csv


@needs_data
def test_e2e_valid_txt_groups_like_the_devset():
    groups = ef.load_e2e_eval_file(DATA / "e2e" / "lora_format" / "valid.txt")
    assert len(groups) == 547 and sum(len(refs) for _, refs in groups) == 4672


def test_e2e_wrong_layout(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("just a sentence\n", encoding="utf-8")
    with pytest.raises(DataError, match="mr,ref") as info:
        ef.load_e2e_eval_file(path)
    assert str(path) in str(info.value)
    path.write_text("MR\nname[Aromi]\n", encoding="utf-8")  # testset.csv: MRs without references
    with pytest.raises(DataError, match="no 'ref' column"):
        ef.load_e2e_eval_file(path)


def test_check_mrs_match():
    run = ["name : A | Type : pub ||", "name : B ||"]
    ef.check_mrs_match(run, ["name : A | Type : pub", "name :  B"], "refs.txt")  # separator and spacing ignored
    with pytest.raises(DataError, match=r"refs.txt: its MRs do not match.*first missing: 'name : B'"):
        ef.check_mrs_match(run, ["name : A | Type : pub", "name : C"], "refs.txt")
    with pytest.raises(DataError, match="1 MRs in the file, 2 in the run"):
        ef.check_mrs_match(run, ["name : A | Type : pub"], "refs.txt")
    with pytest.raises(DataError, match="another order"):
        ef.check_mrs_match(run, ["name : B", "name : A | Type : pub"], "refs.txt")
