"""The benchmark runner and its report, with a stand-in for the server."""

from __future__ import annotations

import json

import pytest

from sglang_loopserve.bench import datasets, report, runner
from sglang_loopserve.bench.__main__ import parse_args


def fake_ask(calls, settings_seen=None):
    def ask(history, message, max_tokens, settings):
        calls.append((len(history), settings["method"], [h[1] for h in history]))
        if settings_seen is not None:
            settings_seen.append((settings, max_tokens))
        answer = "42" if settings["method"] == "full" else f"{settings['method']} says 42"
        return {"answer": answer, "prompt_tokens": len(message) // 4, "cached_tokens": 10 * len(history),
                "completion_tokens": 3, "time_to_first_token_s": 0.5, "decode_tokens_per_s": 10.0,
                "prefill_density": 0.5 if settings["method"] == "loopserve" else 1.0,
                "decode_tokens_attended": 100.0, "decode_tokens_cached": 400.0}
    return ask


@pytest.fixture
def convs():
    return datasets.build("kv_retrieval", 2, seed=0, scale=0.2)


def test_runner_resumes_a_half_written_results_file(tmp_path, convs):
    path = tmp_path / "results.jsonl"
    methods, positions = ["full", "loopserve"], ["front", "end"]
    calls = []
    first = runner.run(convs[:1], positions, methods, fake_ask(calls), path)
    assert len(first) == 4 and len(calls) == 4 * 3  # 1 conversation x 2 positions x 2 methods, 3 turns each
    with path.open("a") as f:
        f.write('{"dataset": "kv_retrieval", "id": "torn')  # an interrupted write
    calls.clear()
    second = runner.run(convs, positions, methods, fake_ask(calls), path)
    assert len(second) == 4 and len(calls) == 4 * 3  # only the second conversation ran
    keys = [r.key for r in runner.load_results(path)]
    assert len(keys) == len(set(keys)) == 8
    calls.clear()
    assert runner.run(convs, positions, methods, fake_ask(calls), path) == [] and not calls


def test_history_is_the_models_answers_or_the_gold_ones(tmp_path, convs):
    calls = []
    rec = runner.run(convs[:1], ["back"], ["snapkv"], fake_ask(calls), tmp_path / "a.jsonl")[0]
    assert calls[2][2] == ["snapkv says 42", "snapkv says 42"]
    assert rec.turns[0].score == 0.0  # exact_match: the value is not "42"
    calls.clear()
    runner.run(convs[:1], ["back"], ["snapkv"], fake_ask(calls), tmp_path / "b.jsonl", gold_history=True)
    assert calls[2][2] == [t.answers[0] for t in convs[0].turns[:2]]


def test_report_scores_agreement_speed_and_trace(tmp_path, convs):
    path = tmp_path / "results.jsonl"
    runner.run(convs, ["front", "back"], ["full", "loopserve", "snapkv"], fake_ask([]), path)
    s = report.summarize(runner.load_results(path))
    assert s["methods"] == ["full", "loopserve", "snapkv"] and s["positions"] == ["front", "back"]
    assert s["scores"]["kv_retrieval|back|full"] == 0.0
    assert s["agreement_with_full"]["full"]["back"] == {"same": 1.0, "first_difference": None}
    # "loopserve says 42" vs "42": differs at the first word
    assert s["agreement_with_full"]["loopserve"]["front"] == {"same": 0.0, "first_difference": 0}
    turn3 = s["speed_per_turn"]["loopserve"][2]
    assert turn3["turn"] == 3 and turn3["cached_tokens"] == 20 and turn3["kv_read"] == 0.25
    files = report.write(s, tmp_path / "out")
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| kv_retrieval | back | 0.0 | 0.0 | 0.0 |" in table and "**mean**" in table
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["runs"] == 12
    assert "loopserve_minus_window_methods.png" in {f.name for f in files}
    assert all(f.exists() for f in files)
    assert {f.name for f in files} >= {"score_by_position.png", "speed_per_turn.png"}
    assert s["read_and_computed"]["loopserve"] == {"decode_positions_read": 100.0, "decode_positions_cached": 400.0,
                                                   "kv_read": 0.25, "prefill_density": 0.5}
    assert "| loopserve | 100 / 400 | 0.25 | 0.50 |" in table
    trace = report.agentic_trace(convs, "back")
    assert len(trace["conversations"]) == 2 and len(trace["conversations"][0]) == 3
    first_turn = trace["conversations"][0][0]["messages"]
    assert [m["role"] for m in first_turn] == ["system", "user"]
    assert first_turn[1]["content"] == convs[0].turns[0].prompts["back"]


def test_cli_rejects_bad_arguments(capsys):
    for argv, word in ((["--out", "x", "--positions", "top"], "--positions"), (["--out", "x", "--n", "0"], "--n"),
                       (["--out", "x", "--methods", "h2o"], "--methods"), (["--out", "x", "--read", "0"], "--read"),
                       (["--out", "x", "--budget", "1187"], "--read"),
                       (["--out", "x", "--min-prefill-len", "-2"], "--min-prefill-len")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert word in capsys.readouterr().err
    a = parse_args(["--out", "x", "--positions", "start", "end", "--methods", "full", "adakv"])
    assert a.positions == ["front", "back"] and a.methods == ["full", "adakv"]
    assert a.min_prefill_len == 0  # the methods' prefill runs at scaled-down sizes by default


def served_reads(settings, cached, n_tokens, seed_steps=4):
    """Cached positions each decode step of an ``n_tokens`` answer reads, as the server reads them:
    a step reads its selection plus the turn's tokens generated so far (its own included); LoopServe
    reads every cached token until its first re-selection (``decode_seed`` auto on a long turn),
    then its selection plus its query blocks."""
    if settings["method"] == "full":
        return [cached + t + 1 for t in range(n_tokens)]
    if settings["method"] == "loopserve":
        selection = settings["decode_budget"] + settings["decode_query_blocks"] * runner.QUERY_BLOCK_TOKENS
        return [cached + t + 1 if t < seed_steps else min(selection, cached) + t - seed_steps + 1
                for t in range(n_tokens)]
    return [min(settings["decode_budget"], cached) + t + 1 for t in range(n_tokens)]


def reading_ask(seen, n_tokens=10):
    def ask(history, message, max_tokens, settings):
        seen.append(settings)
        got = fake_ask([])(history, message, max_tokens, settings)
        cached = 3000 * (len(history) + 1)
        reads = served_reads(settings, cached, n_tokens)
        got.update(prompt_tokens=cached, cached_tokens=cached - 3000, completion_tokens=n_tokens,
                   decode_tokens_attended=sum(reads) / len(reads), decode_tokens_cached=cached + (n_tokens + 1) / 2)
        return got
    return ask


@pytest.mark.parametrize("read", [runner.DEFAULT_READ, 2048])
def test_every_compressing_method_reads_the_same(tmp_path, convs, read):
    methods = ["full", "snapkv", "adakv", "streaming_llm", "loopserve"]
    seen = []
    runner.run(convs[:1], ["back"], methods, reading_ask(seen), tmp_path / "r.jsonl", read=read,
               settings={"min_prefill_len": 0})
    assert [s["method"] for s in seen][:3] == ["loopserve"] * 3  # first: the baselines match its reads
    # LoopServe's own selection is the read less its query blocks (512 of 1664 at the defaults)
    assert {s["decode_budget"] for s in seen if s["method"] == "loopserve"} == {read - 144 * 8}
    records = {r.method: r for r in runner.load_results(tmp_path / "r.jsonl")}
    for turn, ls in enumerate(records["loopserve"].turns):
        # its seed steps read the whole cache: over a 10-token answer it reads well above --read
        assert ls.decode_tokens_attended > 1.1 * read
        for m in ("snapkv", "adakv", "streaming_llm"):
            assert abs(records[m].turns[turn].decode_tokens_attended - ls.decode_tokens_attended) <= 0.5, (m, turn)
        assert records["full"].turns[turn].decode_tokens_attended > ls.decode_tokens_attended
    assert all(s["min_prefill_len"] == 0 for s in seen)  # the run's settings still reach every request
    # the server accepts each method's settings
    from sglang_loopserve.config import LoopServeConfig
    for s in seen:
        LoopServeConfig().override(s)
    # without LoopServe to match, a baseline's budget is the read
    seen.clear()
    runner.run(convs[:1], ["back"], ["snapkv"], reading_ask(seen), tmp_path / "alone.jsonl", read=read)
    assert {s["decode_budget"] for s in seen} == {read}
    with pytest.raises(ValueError, match="read must be >= 1188"):
        runner.method_settings("loopserve", 1000)
    t = runner.TurnRecord("", 0, 100, 60, 9, None, None, None, 30.0, 100.0)
    assert runner.matched_decode_budget(t) == 36  # never under the server's floor (sink + recent)
    assert runner.matched_decode_budget(runner.TurnRecord("", 0, 100, 60, 9, None, None, None, None, None)) is None


def test_answer_lengths_follow_longbench(tmp_path):
    seen = []
    for name, want in (("summarization", 128), ("multi_hop_2", 32), ("single_doc_qa", 64), ("few_shot", 64)):
        seen.clear()
        conv = datasets.build(name, 1, seed=0, scale=0.1)
        runner.run(conv, ["back"], ["full"], fake_ask([], seen), tmp_path / f"{name}.jsonl")
        assert {m for _, m in seen} == {want}, name
    assert datasets.answer_tokens("some_published_set", "rouge_l") == 128
    assert datasets.answer_tokens("some_published_set", None) == 32


def test_prefill_patterns_match_loopserves_compute_per_turn(tmp_path, convs):
    seen = []
    density = {0: 0.5, 1: 0.25, 2: None}

    def ask(history, message, max_tokens, settings):
        seen.append((len(history), settings))
        got = fake_ask([])(history, message, max_tokens, settings)
        got.update(prompt_tokens=1000 * (len(history) + 1), cached_tokens=1000 * len(history))
        if settings["method"] == "loopserve":
            got["prefill_density"] = density[len(history)]
        return got

    # asked in the other order: LoopServe still runs first, so the pattern can match it
    runner.run(convs[:1], ["back"], ["minference", "loopserve"], ask, tmp_path / "r.jsonl", read=2048)
    assert [s["method"] for _, s in seen] == ["loopserve"] * 3 + ["minference"] * 3
    pattern = {turn: s["decode_budget"] for turn, s in seen if s["method"] == "minference"}
    # turn 1: 1000 new rows, no history: 0.5 x 500,500 pairs / 1000 rows; turn 2: 0.25 x (1000 x 1000
    # + 500,500) / 1000; turn 3: no density measured, the read applies
    assert pattern == {0: 250, 1: 375, 2: 2048}
    t = runner.TurnRecord("", 0, 100, 60, 1, None, None, 0.001, None, None)
    assert runner.matched_prefill_keys(t) == 36  # never under the server's floor (sink + recent)
