import pytest

from matrec.experiment.paired import (cell_name, named_pairs, paired_differences, paired_section, pairs_section,
                                     parse_pair)


def _cell(label, values, swept=None, metric="loss", failed=()):
    seeds = [{"seed": s, "state": "done", "final": {metric: v}} for s, v in values.items()]
    seeds += [{"seed": s, "state": "failed", "final": {}} for s in failed]
    return {"label": label, "swept": swept or {}, "seeds": seeds}


def test_each_cell_minus_the_best_cell_seed_by_seed():
    exp = {"metric": "loss", "cells": [
        _cell("a", {0: 2.0, 1: 2.5, 2: 2.1}),
        _cell("b", {0: 1.9, 1: 2.3, 2: 2.0}, swept={"train.lr": 0.002}),   # the best mean
        _cell("c", {0: 1.8, 1: 2.4, 2: 2.2}),                              # better on seed 0 only
        _cell("d", {0: 1.0}),                                              # one seed: no pairs
        _cell("e", {0: 2.2, 1: 2.2}, failed=[2]),                          # seeds 0 and 1 only
        _cell("f", {None: 0.5, 0: 0.5}),                                   # no seed: pairs with nothing
    ]}
    paired = paired_differences(exp)
    assert paired["reference"] == "b lr=0.002"
    rows = {r["cell"]: r for r in paired["rows"]}
    assert set(rows) == {"a", "c", "e"}
    assert rows["a"]["differences"] == pytest.approx({0: 0.1, 1: 0.2, 2: 0.1})
    assert rows["a"]["mean"] == pytest.approx(0.4 / 3) and rows["a"]["seeds_better"] == 0
    assert rows["c"]["differences"] == pytest.approx({0: -0.1, 1: 0.1, 2: 0.2}) and rows["c"]["seeds_better"] == 1
    assert rows["e"]["seeds"] == 2 and rows["e"]["differences"] == pytest.approx({0: 0.3, 1: -0.1})
    assert [r["cell"] for r in paired["rows"]] == ["c", "e", "a"]   # nearest the reference first
    text = "\n".join(paired_section(paired))
    assert "minus b lr=0.002's" in text and "| c | -0.1000 | +0.1000 | +0.2000 | +0.0667 | 1/3 |" in text
    assert "| e | +0.3000 | -0.1000 | - | +0.1000 | 1/2 |" in text


def test_a_metric_where_higher_is_better_picks_the_highest_and_an_unknown_one_none():
    exp = {"metric": "recall", "cells": [_cell("a", {0: 0.5, 1: 0.6}, metric="recall"),
                                         _cell("b", {0: 0.9, 1: 0.4}, metric="recall"),
                                         _cell("c", {0: 0.2, 1: 0.3}, metric="recall")]}
    paired = paired_differences(exp)
    assert paired["reference"] == "b" and [r["cell"] for r in paired["rows"]] == ["a", "c"]
    assert paired["rows"][0]["seeds_better"] == 1   # a's 0.6 beats b's 0.4 on seed 1
    assert paired_differences({**exp, "metric": "perplexity_of_sorts"}) is None
    assert paired_differences({"metric": "loss", "cells": [_cell("a", {0: 1.0, 1: 1.0})]}) is None
    assert paired_section(None) == []


def test_cell_names_carry_the_swept_values():
    assert cell_name({"label": "mru", "swept": {"train.lr": 0.004, "task_args.delay": 100}}) == "mru delay=100 lr=0.004"
    assert cell_name({"label": "gru", "swept": {"model_args.mode": "fast"}}) == "gru mode=fast"


def test_named_pairs_seed_by_seed_and_their_errors():
    exp = {"metric": "loss", "cells": [_cell("a", {0: 2.0, 1: 2.5, 2: 2.1}),
                                       _cell("b", {0: 1.9, 1: 2.3}, swept={"train.lr": 0.002})]}
    rows = named_pairs(exp, [("a", "b lr=0.002"), ("b lr=0.002", "a"), ("a", "missing")])
    assert [(r["a"], r["b"]) for r in rows] == [("a", "b lr=0.002"), ("b lr=0.002", "a")]
    assert rows[0]["differences"] == pytest.approx({0: 0.1, 1: 0.2}) and rows[0]["mean"] == pytest.approx(0.15)
    assert rows[1]["mean"] == pytest.approx(-0.15)
    text = "\n".join(pairs_section("loss", rows))
    assert "| a − b lr=0.002 | +0.1000 | +0.2000 | +0.1500 |" in text
    assert parse_pair(" mru-identity : mru-scaled ") == ("mru-identity", "mru-scaled")
    for bad in ("mru-identity", "a:b:c", ":b"):
        with pytest.raises(ValueError, match="--pair must read A:B"):
            parse_pair(bad)
