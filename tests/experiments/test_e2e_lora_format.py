"""The E2E CSV → LoRA-format converter against LoRA's own valid.txt, and the reader/grouper on small files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasa_peft.experiments.tasks import e2e_lora_format as lf
from kasa_peft.experiments.tasks.common import DataError

_HERE = Path(__file__).resolve()
# ../shared/data next to the checkout (main), or two levels up (a worktree under /work/wt/).
DATA = next((p for p in (_HERE.parents[2].parent / "shared" / "data", _HERE.parents[4] / "shared" / "data") if p.is_dir()),
            _HERE.parents[2].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "e2e" / "lora_format" / "valid.txt").is_file(), reason="../shared/data is not present")


def _csv(tmp_path: Path, rows: list[tuple[str, str]], header: str = "mr,ref") -> Path:
    import csv

    path = tmp_path / "refs.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


@needs_data
def test_devset_reproduces_loras_valid_txt_byte_for_byte(tmp_path):
    out = tmp_path / "valid.txt"
    assert lf.write_lora_format(DATA / "e2e" / "devset.csv", out) == 4672
    assert out.read_bytes() == (DATA / "e2e" / "lora_format" / "valid.txt").read_bytes()


def test_mr_keys_renamed_and_values_tokenised():
    mr = "name[The Vaults], eatType[pub], priceRange[£20-25], familyFriendly[yes], near[Café Adriatic]"
    assert lf.format_lora_mr(mr) == "name : The Vaults | Type : pub | price : £ 20 - 25 | family friendly : yes | near : Café Adriatic"
    with pytest.raises(DataError, match="meaning representation"):
        lf.format_lora_mr("no slots here")


@pytest.mark.parametrize("text, expected", [
    # a period inside the text ends a sentence, so Moses splits it off (it only splits a final period)
    ("It serves English food. it is cheap.", "It serves English food . it is cheap ."),
    ("It costs less than £20. its rating is low", "It costs less than £ 20 . its rating is low"),
    # a bare number followed by a lower-case word does not end a sentence (Punkt's orthographic heuristic)
    ("rated 1 out of 5. in the city centre", "rated 1 out of 5. in the city centre"),
    ("rated 1 out of 5. It is cheap.", "rated 1 out of 5 . It is cheap ."),
    # an abbreviation does not end a sentence; Moses keeps St. (a non-breaking prefix)
    ("It is near St. John's College.", "It is near St. John 's College ."),
    # aggressive dash splitting written as a bare dash, no XML escaping of quotes/ampersands
    ("a kid-friendly \"pub\" & bar", "a kid - friendly \" pub \" & bar"),
    ("It isn't family-friendly.. It is cheap", "It isn 't family - friendly .. It is cheap"),
])
def test_reference_tokenisation(text, expected):
    assert lf.tokenize_reference(text) == expected


def test_csv_to_lines_write_read_and_group_roundtrip(tmp_path):
    rows = [("name[A], area[riverside]", "A is by the river."), ("name[A], area[riverside]", "On the riverside: A pub."),
            ("name[B], eatType[pub]", "B is a pub.")]
    lines = lf.csv_to_lora_lines(_csv(tmp_path, rows))
    assert lines == ["name : A | area : riverside||A is by the river . ", "name : A | area : riverside||On the riverside : A pub . ",
                     "name : B | Type : pub||B is a pub . "]
    out = tmp_path / "sub" / "out.txt"
    lf.write_lora_format(_csv(tmp_path, rows), out)
    assert out.read_text(encoding="utf-8") == "".join(line + "\n" for line in lines)
    pairs = lf.read_lora_format(out)
    assert pairs[0] == ("name : A | area : riverside", "A is by the river .")
    groups = lf.group_by_mr(pairs)
    assert [mr for mr, _ in groups] == ["name : A | area : riverside", "name : B | Type : pub"]
    assert [len(refs) for _, refs in groups] == [2, 1]


def test_group_by_mr_keeps_first_appearance_order():
    pairs = [("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")]
    assert lf.group_by_mr(pairs) == [("b", ["1", "3"]), ("a", ["2", "5"]), ("c", ["4"])]


def test_testset_w_refs_layout_with_capitalised_header(tmp_path):
    path = _csv(tmp_path, [("name[Aromi]", "Aromi.")], header="MR,ref")
    assert lf.csv_to_lora_lines(path) == ["name : Aromi||Aromi . "]


@pytest.mark.parametrize("content, message", [
    ("MR\nname[A]\n", "no 'ref' column"),
    ("text,label\nx,1\n", "header must name columns mr,ref"),
    ("", "empty"),
])
def test_bad_csvs_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        lf.csv_to_lora_lines(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"name : A||x||y\n", "one 'MR||reference'"),
    (b"just text\n", "one 'MR||reference'"),
    (b"\x00\x01\x02binary", "binary"),
    (b"\xff\xfe\xfa", "not UTF-8"),
    (b"\n\n", "no 'MR||reference' lines"),
])
def test_bad_lora_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        lf.read_lora_format(path)
    assert str(path) in str(info.value)


def test_cli_subcommand_converts_and_reports_bad_input(tmp_path):
    from typer.testing import CliRunner

    from kasa_peft.experiments.cli import app

    runner = CliRunner()
    src = _csv(tmp_path, [("name[Aromi], familyFriendly[no]", "Aromi is not family-friendly.")])
    out = tmp_path / "out.txt"
    done = runner.invoke(app, ["data", "e2e-lora-format", str(src), str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_text(encoding="utf-8") == "name : Aromi | family friendly : no||Aromi is not family - friendly . \n"
    bad = runner.invoke(app, ["data", "e2e-lora-format", str(tmp_path / "missing.csv"), str(out)])
    assert bad.exit_code == 2 and "missing.csv" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["data", "--help"]).exit_code == 0
