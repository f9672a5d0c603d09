import random

from tunesmith.config.schema import DatasetConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.transform import (convert_row, dedup_rows, duplicate_clusters, mix_sources, packing_stats,
                                      row_text, split_assignments, SourcePlan)
from helpers import write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon".split()


def paragraph(rng: random.Random, length: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def rows_of(path):
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=str(path)), report)
    assert not report.errors, report.errors
    return rows


def test_near_duplicates_never_cross_the_split_boundary(tmp_path):
    rng = random.Random(0)
    base = [paragraph(rng) for _ in range(60)]
    texts = base + [t.replace("alpha", "ALPHA!", 1) + " omega" for t in base[:20]]  # 20 planted near-duplicates
    data = [{"instruction": "Summarise.", "input": t, "output": "ok " + str(i % 60)} for i, t in enumerate(texts)]
    rows = rows_of(write_jsonl(tmp_path / "d.jsonl", data))
    groups = duplicate_clusters([row_text(r.row) for r in rows], near=0.8)
    together = {(i, i + 60) for i in range(20) if any(i in g and i + 60 in g for g in groups)}
    assert len(together) == 20, "MinHash missed planted near-duplicates"
    assert all(len(g) == 2 for g in groups), f"unrelated rows were merged: {groups}"

    def leaks(assignment):
        return sum(assignment[i] != assignment[i + 60] for i in range(20))

    with_near = split_assignments(len(rows), 0.2, 0.2, seed=3, groups=groups)
    assert leaks(with_near) == 0
    assert leaks(split_assignments(len(rows), 0.2, 0.2, seed=3)) > 0, "the plant should leak without --near"
    assert with_near == split_assignments(len(rows), 0.2, 0.2, seed=3, groups=groups)  # reproducible


def test_stratified_split_keeps_category_shares():
    strata = ["a"] * 80 + ["b"] * 20
    assignment = split_assignments(100, 0.1, 0.1, seed=0, strata=strata)
    for name, size in (("a", 80), ("b", 20)):
        members = [a for a, s in zip(assignment, strata) if s == name]
        assert members.count("val") == round(0.1 * size) and members.count("test") == round(0.1 * size)


def test_dedup_keeps_the_first_of_each_cluster(tmp_path):
    rng = random.Random(1)
    text = paragraph(rng, 60)
    data = [{"text": text}, {"text": paragraph(rng, 60)}, {"text": text.upper() + "!"},
            {"text": text.replace("beta", "BETA", 1) + " extra"}]
    rows = rows_of(write_jsonl(tmp_path / "t.jsonl", data))
    exact = dedup_rows(rows)
    assert [r.line for r in exact.kept] == [1, 2, 4]
    assert exact.removed == [{"kept": f"{tmp_path / 't.jsonl'}:1", "removed": [f"{tmp_path / 't.jsonl'}:3"]}]
    near = dedup_rows(rows, near=0.8)
    assert [r.line for r in near.kept] == [1, 2]


def test_convert_says_what_it_cannot_carry():
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    try:
        convert_row(multi, "alpaca")
        raise AssertionError("a two-exchange row cannot be alpaca")
    except ValueError as err:
        assert "2 exchanges; alpaca holds one" in str(err)
    assert convert_row(multi, "sharegpt")["conversations"][3] == {"from": "gpt", "value": "d"}
    single = {"messages": [{"role": "system", "content": "S"}] + multi["messages"][:2]}
    assert convert_row(single, "alpaca") == {"instruction": "a", "input": "", "output": "b", "system": "S"}


def test_mix_weights_caps_and_category_balance(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"instruction": f"q{i}", "output": "a", "category": "x" if i < 90
                                                else "y"} for i in range(100)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"instruction": f"s{i}", "output": "b"} for i in range(10)])
    plans = [SourcePlan(rows_of(big), category_column="category", category_cap=30, category_min=20, name="big"),
             SourcePlan(rows_of(small), weight=2.5, name="small")]
    mixed = mix_sources(plans, seed=0)
    by_source = [name for name, _ in mixed]
    assert by_source.count("big") == 50 and by_source.count("small") == 25
    categories = [row.raw["category"] for name, row in mixed if name == "big"]
    assert categories.count("x") == 30 and categories.count("y") == 20  # capped and up-sampled
    assert mixed == mix_sources([SourcePlan(p.rows, p.weight, p.max_rows, p.category_column, p.category_cap,
                                            p.category_min, p.name) for p in plans], seed=0)


def test_packing_reduces_padding():
    stats = packing_stats([100, 30, 60, 20, 90, 40], 128)
    assert stats["packed_sequences"] < stats["padded_sequences"]
    assert stats["padding_share_packed"] < stats["padding_share_unpacked"]
