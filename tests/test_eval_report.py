"""Report writing: schema checks, markdown tables, plots, refusal to clobber, atomic output."""

import json
import math

import numpy as np
import pytest

from eval.report import render_markdown, write_results
from hdflash_jax.errors import OutputRefused, UsageError
from eval.results import Results


def cell(tau, rates, hist, speedup, tokens=100, wall=2.0, score=None, match=None):
    return {
        "tau": tau, "accept_rate_by_pos": rates, "accepted_hist": hist, "tokens": tokens,
        "tokens_per_s": tokens / wall, "wall_s": wall, "compile_s": 5.0, "speedup": speedup,
        "greedy_match_ar": match, "score": score,
    }


def make_results():
    # dflash gsm8k: hist [1,1,2] over 4 steps -> r = [3/4, 2/4], tau = 1 + 1.25 = 2.25
    # dflash mbpp : hist [0,2,2] -> r = [1, 2/4], tau = 2.5 ; pooled hist [1,3,4] -> r=[7/8, 4/8]
    return {
        "config": {"block_size": 3},
        "versions": {"numpy": np.__version__},
        "suites": {
            "gsm8k": {
                "ar": cell(1.0, [], [10], 1.0, score=0.5),
                "dflash": cell(2.25, [0.75, 0.5], [1, 1, 2], np.float64(2.0), score=0.5, match=True),
            },
            "mbpp": {
                "ar": cell(1.0, [], [8], 1.0),
                "dflash": cell(2.5, [1.0, 0.5], np.array([0, 2, 2]), 3.0, match=np.bool_(False)),
            },
        },
    }


def test_markdown_table_cells():
    md = render_markdown(make_results())
    assert "| method | gsm8k | mbpp | avg |" in md
    assert "| ar | 1.00× / 1.00 | 1.00× / 1.00 | 1.00× / 1.00 |" in md
    assert "| dflash | 2.00× / 2.25 | 3.00× / 2.50 | 2.50× / 2.38 |" in md
    # pooled per-position table: hist [1,3,4] -> 8 steps, r1 = 0.875, r2 = 0.5, tau = 2.375
    assert "| dflash | 8 | 2.38 | 0.875 | 0.500 |" in md


def test_wall_clock_table_marks_the_replay_ceiling():
    r = make_results()
    for su, ar_prefill in (("gsm8k", 0.5), ("mbpp", 1.5)):
        cells = r["suites"][su]
        cells["ar"].update(decode_speedup=1.0, prefill_s=ar_prefill)
        cells["dflash"].update(decode_speedup=3.0, prefill_s=0.5)
        cells["replay"] = {**cell(4.0, [1.0, 1.0], [0, 0, 4], 3.5), "decode_speedup": 5.0, "prefill_s": 0.5}
    md = render_markdown(r)
    # decode speedup / τ = 3 / 2.375 and 5 / 4; prefill share of AR's wall = (0.5 + 1.5) / (2 + 2)
    assert "| dflash | 2.50× | 3.00× | 2.38 | 1.26 | 50% |" in md
    assert "| replay (ceiling) | 3.50× | 5.00× | 4.00 | 1.25 | 50% |" in md


def test_write_results_files(tmp_path):
    out = write_results(tmp_path / "run", make_results())
    assert sorted(p.name for p in out.iterdir()) == [
        "acceptance_by_position.png", "accepted_length_hist.png", "results.json", "results.md",
    ]
    data = json.loads((out / "results.json").read_text())
    assert data["suites"]["mbpp"]["dflash"]["accepted_hist"] == [0, 2, 2]
    assert data["suites"]["mbpp"]["dflash"]["greedy_match_ar"] is False
    assert data["suites"]["gsm8k"]["dflash"]["speedup"] == 2.0
    for png in ("accepted_length_hist.png", "acceptance_by_position.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_nan_becomes_null(tmp_path):
    r = make_results()
    r["suites"]["gsm8k"]["dflash"]["tokens_per_s"] = math.nan
    out = write_results(tmp_path / "run", r)
    assert json.loads((out / "results.json").read_text())["suites"]["gsm8k"]["dflash"]["tokens_per_s"] is None


def test_refuses_nonempty_dir_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_results(out, make_results())  # empty dir is fine
    with pytest.raises(OutputRefused, match=f"{out}: destination exists"):
        write_results(out, make_results())
    r = make_results()
    r["config"]["block_size"] = 99
    write_results(out, r, overwrite=True)
    assert json.loads((out / "results.json").read_text())["config"]["block_size"] == 99
    # a folder of the user's own files is never replaced, with or without overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputRefused, match="is not an eval.run results folder"):
        write_results(mine, make_results(), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_schema_errors_name_the_entry(tmp_path):
    r = make_results()
    del r["suites"]["mbpp"]["dflash"]["tau"]
    with pytest.raises(ValueError, match=r"\['mbpp'\]\['dflash'\].*tau"):
        Results.from_json(r)
    with pytest.raises(ValueError):
        write_results(tmp_path / "run", r)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="versions"):
        Results.from_json({"config": {}, "suites": {}})


def test_results_records_round_trip(tmp_path):
    """results.json read back into typed records writes the same file; unknown keys are kept."""
    r = make_results()
    r["suites"]["gsm8k"]["dflash"]["custom"] = {"a": 1}
    r["isolation"] = {"kind": "test"}
    out = write_results(tmp_path / "run", r)
    data = json.loads((out / "results.json").read_text())
    assert data["suites"]["gsm8k"]["dflash"]["custom"] == {"a": 1} and data["isolation"] == {"kind": "test"}
    # steps and block size follow from the histogram when a cell does not give them
    assert data["suites"]["gsm8k"]["dflash"]["steps"] == 4 and data["suites"]["gsm8k"]["dflash"]["block_size"] == 3
    back = Results.from_json(data)
    assert back.suites["mbpp"]["dflash"].stats.accepted_hist == (0, 2, 2)
    assert back.suites["mbpp"]["dflash"].greedy_match_ar is False
    assert json.loads(json.dumps(back.to_json())) == data


def _prompts(rows):
    return [{"id": f"p{i}", "tokens": t, "steps": s, "accepted_tokens": a, "wall_s": w, "decode_s": d}
            for i, (t, s, a, w, d) in enumerate(rows)]


def seeded_results():
    """AR and two seeds of one variant, per-prompt figures: τ of seed 0 = 12/6 = 2, of seed 1 = 18/6 = 3."""
    ar = {**cell(1.0, [], [12], 1.0, tokens=12, wall=4.0),
          "per_prompt": _prompts([(6, 6, 6, 2.0, 1.5), (6, 6, 6, 2.0, 1.5)]), "prefill_s": 1.0}
    s0 = {**cell(2.0, [0.5], [3, 3], 2.0, tokens=12, wall=2.0), "seeds": [0],
          "per_prompt": _prompts([(6, 3, 6, 1.0, 0.5), (6, 3, 6, 1.0, 0.5)]), "prefill_s": 1.0,
          "tau_ci": [2.0, 2.0], "speedup_ci": [2.0, 2.0], "decode_speedup": 3.0, "decode_speedup_ci": [3.0, 3.0]}
    s1 = {**cell(3.0, [1.0], [0, 6], 4.0, tokens=12, wall=1.0), "seeds": [1],
          "per_prompt": _prompts([(6, 2, 6, 0.5, 0.25), (6, 2, 6, 0.5, 0.25)]), "prefill_s": 0.5,
          "decode_speedup": 6.0, "decode_speedup_ci": [6.0, 6.0]}
    r = {"config": {}, "versions": {}, "suites": {"gsm8k": {"ar": ar, "hd-s0": s0, "hd-s1": s1}}}
    from eval.report import seed_groups
    typed = Results.from_json(r)
    return Results(typed.config, typed.versions, typed.suites, seed_groups=seed_groups(typed.suites))


def test_intervals_and_seed_groups_in_tables_and_json(tmp_path):
    res = seeded_results()
    g = res.seed_groups["hd"]["gsm8k"]
    assert g.seeds == (0, 1) and g.tau_by_seed == (2.0, 3.0) and g.tau == pytest.approx(2.5)
    assert 2.0 <= g.tau_ci[0] <= 2.5 <= g.tau_ci[1] <= 3.0  # two seeds drawn with replacement: 2, 2.5 or 3
    assert g.speedup_by_seed == (2.0, 4.0) and g.speedup == pytest.approx(3.0)
    md = render_markdown(res)
    assert "| hd-s0 | 2.00× [2.00, 2.00] / 2.00 [2.00, 2.00] |" in md
    # wall-clock table: decode speedup 3.0 / τ 2.0 = 1.50; AR prefill share 1.0 / 4.0
    assert "| hd-s0 | 2.00× [2.00, 2.00] | 3.00× [3.00, 3.00] | 2.00 [2.00, 2.00] | 1.50 | 25% |" in md
    assert "| hd | 0,1 |" in md
    out = write_results(tmp_path / "run", res)
    data = json.loads((out / "results.json").read_text())
    cell0 = data["suites"]["gsm8k"]["hd-s0"]
    assert cell0["tau_ci"] == [2.0, 2.0] and cell0["seeds"] == [0] and len(cell0["per_prompt"]) == 2
    assert data["seed_groups"]["hd"]["gsm8k"]["tau_by_seed"] == [2.0, 3.0]
    back = Results.from_json(data)
    assert back.seed_groups["hd"]["gsm8k"] == g and back.suites["gsm8k"]["hd-s1"].per_prompt[0].decode_s == 0.25
    assert json.loads(json.dumps(back.to_json())) == data


def test_merge_runs_joins_seeds_from_separate_runs(tmp_path, capsys):
    from eval.merge_runs import main, merge_runs

    res = seeded_results().to_json()
    su = res["suites"]["gsm8k"]
    run0 = {**res, "suites": {"gsm8k": {"ar": su["ar"], "hd-s0": su["hd-s0"]}}}
    # the second run's AR took twice as long (a loaded machine): the same tokens, other seconds
    slow_ar = {**su["ar"], "per_prompt": [{**p, "wall_s": 2 * p["wall_s"]} for p in su["ar"]["per_prompt"]]}
    run1 = {**res, "suites": {"gsm8k": {"ar": slow_ar, "hd-s1": su["hd-s1"]}}}
    for name, r in (("a", run0), ("b", run1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    (tmp_path / "pipe.json").write_text(json.dumps({"runs": {"seeds": run1}}))
    assert main([str(tmp_path / "m"), str(tmp_path / "a"), f"{tmp_path / 'pipe.json'}#seeds"]) == 0
    data = json.loads((tmp_path / "m" / "results.json").read_text())
    assert data["seed_groups"]["hd"]["gsm8k"]["tau_by_seed"] == [2.0, 3.0]  # one run each, one group
    # hd-s1 keeps the speedup against its own run's AR; its seconds would pair with the first run's AR, so they
    # are dropped and nothing is re-drawn from them (no avg interval, no seed speedup interval)
    s1 = data["suites"]["gsm8k"]["hd-s1"]
    assert s1["speedup"] == 4.0 and all(p["wall_s"] is None for p in s1["per_prompt"])
    assert data["seed_groups"]["hd"]["gsm8k"]["speedup"] == 3.0
    assert data["seed_groups"]["hd"]["gsm8k"]["speedup_ci"] is None
    md = (tmp_path / "m" / "results.md").read_text()
    assert "| hd-s1 | 4.00× / 3.00 | 4.00× / 3.00 [3.00, 3.00] |" in md  # avg: no speedup interval
    # the write replaces OUT: never merge a run into a folder that holds it
    assert main([str(tmp_path), str(tmp_path / "a")]) == 2
    assert f"--out {tmp_path}: contains the run {tmp_path / 'a'}" in capsys.readouterr().err
    assert (tmp_path / "a" / "results.json").is_file()
    # a method seen twice must agree; other prompts or settings stop the merge
    clash = {**run1, "suites": {"gsm8k": {"ar": su["ar"], "hd-s0": su["hd-s1"]}}}
    other = {**run1, "config": {"argv": ["--max-new-tokens", "64"]}}
    for bad, match in ((clash, "differs from the same method"), (other, "settings")):
        with pytest.raises(UsageError, match=match):
            merge_runs([Results.from_json(run0), Results.from_json(bad)], ["a", "bad"])


def test_seed_compare_reproduces_the_published_seed_means(tmp_path, capsys):
    """eval.seed_compare on the committed seed study gives docs/results.md's means per seed and over seeds; a
    variant whose seed ran other prompts is refused (the difference pairs prompts)."""
    from pathlib import Path

    from eval.merge_runs import read_run
    from eval.seed_compare import compare, main

    run = Path(__file__).resolve().parents[1] / "results/small/seeds/all-greedy"
    cmp = compare(read_run(str(run)), ["hyperdflash", "dflash"], n_boot=200)
    hd, df = cmp["variants"]["hyperdflash"], cmp["variants"]["dflash"]
    assert [round(x, 2) for x in hd["avg_by_seed"]] == [2.82, 2.77, 2.78] and round(hd["avg"], 2) == 2.79
    assert [round(x, 2) for x in df["avg_by_seed"]] == [3.12, 3.20, 2.92] and round(df["avg"], 2) == 3.08
    assert hd["avg_ci"][0] < hd["avg"] < hd["avg_ci"][1]
    d = cmp["differences"]["hyperdflash - dflash"]
    assert d["diff"] == pytest.approx(hd["avg"] - df["avg"]) and d["ci"][0] < d["diff"] < d["ci"][1]
    assert main([str(run), "--variants", "hd-nokl,hd-linear", "--json", str(tmp_path / "c.json")]) == 0
    assert "| hd-nokl - hd-linear |" in capsys.readouterr().out and (tmp_path / "c.json").is_file()
    res = read_run(str(run)).to_json()
    for su in res["suites"].values():
        su["hd-nokl-s1"]["per_prompt"] = su["hd-nokl-s1"]["per_prompt"][1:]
    with pytest.raises(UsageError, match="ran other prompts"):
        compare(Results.from_json(res), ["hd-nokl"])


def test_the_two_tau_averages_and_the_output_hash(tmp_path):
    """Pooled over verify steps vs mean over requests, computed by the runner from per-turn figures: prompt A has a
    5-step turn at τ 2 and a 1-step turn at τ 4, prompt B one 2-step turn at τ 3. Pooled: (10 + 4 + 6) / (5 + 1 + 2)
    = 2.5; per request: (2 + 4 + 3) / 3 = 3.0. Both are named in the tables; the outputs' hash is per suite and
    method, equal for equal tokens, and survives a round trip."""
    from eval.results import TAU_AVERAGES, outputs_sha256
    from eval.runner import Cell, interval_figures

    c = Cell(per_sample={0: [8, 6, 14, 1.0, 0.8], 1: [7, 2, 6, 0.5, 0.4]}, request_tau={0: [2.0, 4.0], 1: [3.0]})
    ar = Cell(per_sample={0: [8, 7, 7, 2.0, 1.8], 1: [7, 6, 6, 1.0, 0.9]}, request_tau={0: [1.0, 1.0], 1: [1.0]})
    fig = interval_figures(c, ar, 2)
    assert fig["tau_per_request"] == pytest.approx(3.0) and fig["tau_ci"][0] <= 2.5 <= fig["tau_ci"][1]
    assert 2.0 <= fig["tau_per_request_ci"][0] <= 3.0 <= fig["tau_per_request_ci"][1] <= 4.0
    assert interval_figures(ar, ar, 2)["tau_per_request"] == 1.0
    same = outputs_sha256([[[5, 6], [7]], [[8]]])
    assert same == outputs_sha256([[np.array([5, 6]), (7,)], [[8]]]) != outputs_sha256([[[5, 6], [7]], [[9]]])
    assert outputs_sha256([[[5, 6], [7]], [[8]]]) != outputs_sha256([[[5], [6, 7]], [[8]]])  # turns are kept apart
    r = make_results()
    r["suites"]["gsm8k"]["dflash"].update(tau_per_request=3.0, tau_per_request_ci=[2.0, 4.0], output_sha256=same,
                                          per_prompt=[{**_prompts([(8, 6, 14, 1.0, 0.8)])[0], "request_tau": [2, 4]}])
    r["suites"]["gsm8k"]["ar"].update(tau_per_request=1.0, output_sha256=same)
    md = render_markdown(r)
    assert "| method | gsm8k pooled / per request | mbpp pooled / per request | avg pooled / per request |" in md
    assert "| dflash | 2.25 / 3.00 | 2.50 / — | 2.38 / — |" in md  # a suite without the figure: no mean of it
    assert "| gsm8k | dflash | 2.25 | 3.00 | 2.00× |" in md and f"| {same[:12]} |" in md
    data = json.loads((write_results(tmp_path / "run", r) / "results.json").read_text())
    cell0 = data["suites"]["gsm8k"]["dflash"]
    assert cell0["output_sha256"] == same and cell0["per_prompt"][0]["request_tau"] == [2.0, 4.0]
    back = Results.from_json(data)
    assert back.suites["gsm8k"]["dflash"].tau_per_request_ci == (2.0, 4.0)
    assert json.loads(json.dumps(back.to_json())) == data
    assert set(TAU_AVERAGES) == {"tau", "tau_per_request"}
