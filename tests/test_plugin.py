"""The plugin's pieces in-process: settings, flags, per-request overrides, endpoint, stats."""

from __future__ import annotations

import json

import pytest

from sglang_loopserve.srt import plugin
from sglang_loopserve.config import (CONFIG_ENV, FLAGS, LoopServeConfig, LoopServeConfigError,
                                     request_field_name)
from sglang_loopserve.srt.request_state import RequestStats

BAD_FLAG_VALUES = [
    ("alpha", "0"), ("alpha", "1.5"), ("alpha", "-0.1"), ("q_window", "0"), ("block_size", "48"),
    ("block_size", "8"), ("min_prefill_len", "-1"), ("decode_budget", "0"), ("decode_interval", "0"),
    ("decode_window", "0"), ("sink", "-1"), ("recent", "-2"), ("decode_budget", "20"),
    ("decode_max_interval", "8"), ("decode_max_interval", "0"), ("decode_seed", "prefill"),
    ("decode_seed", ""), ("decode_first_interval", "0"), ("decode_pooling", "mean"), ("decode_pooling", ""),
    ("decode_query_blocks", "-1"), ("decode_query_blocks", "two"), ("decode_pyramid", "1"),
    ("decode_pyramid", "-0.1"), ("decode_pyramid", "steep"), ("decode_max_read", "1.5"),
    ("decode_max_read", "-0.1"), ("decode_max_read", "most"),
]


def test_defaults_follow_method_doc():
    """The paper's defaults, except alpha 0.90 (the paper's 0.95; sharp layers cover more:
    ``SHARP_BELOW``), the decode budget 512 plus query blocks (``BUDGET``) and the decode interval
    and window 32 and 8 (the paper's 16 and 16; ``INTERVAL``, ``WINDOW``); the server's, the sparse
    prefill's and the compressor's defaults are one."""
    import inspect

    from sglang_loopserve.attention import sparse_prefill_attention
    from sglang_loopserve.cache_policy import DecodeCompressor

    c = LoopServeConfig()
    assert (c.alpha, c.q_window, c.block_size, c.decode_budget) == (0.9, 64, 64, 512)
    params = inspect.signature(sparse_prefill_attention).parameters
    assert (params["alpha"].default, params["q_window"].default, params["block_size"].default) == (
        c.alpha, c.q_window, c.block_size)
    comp = DecodeCompressor()
    assert ((c.decode_interval, c.decode_window, c.decode_first_interval, c.decode_query_blocks)
            == (comp.interval, comp.window, comp.first_interval, comp.query_blocks) == (32, 8, 4, 144))
    assert c.decode_budget == comp.budget
    from sglang_loopserve.cache_policy.decode import PYRAMID

    assert c.decode_pyramid == PYRAMID  # the offline tools' default slope is the server's
    assert c.decode_max_interval == comp.max_interval == 128
    assert c.min_prefill_len is None  # the device's measured break-even
    assert c.validated() is c


def test_per_request_decode_query_blocks():
    base = LoopServeConfig()
    assert base.decode_query_blocks > 0
    assert base.override({"decode_query_blocks": 0}).decode_query_blocks == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_query_blocks"):
            base.override({"decode_query_blocks": bad}, request_field_name)


def test_per_request_decode_pyramid():
    base = LoopServeConfig()
    assert base.override({"decode_pyramid": 0.5}).decode_pyramid == 0.5
    assert base.override({"decode_pyramid": 0}).decode_pyramid == 0
    for bad in (1, 1.0, -0.2, True, "0.5"):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_pyramid"):
            base.override({"decode_pyramid": bad}, request_field_name)


def test_per_request_decode_max_read_and_the_gate():
    from sglang_loopserve.cache_policy.decode import decode_pays

    base = LoopServeConfig()
    assert base.override({"decode_max_read": 1}).decode_max_read == 1
    for bad in (1.01, -0.2, True, "0.5"):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_max_read"):
            base.override({"decode_max_read": bad}, request_field_name)
    # the defaults read 512 + 144 x 8 = 1664 positions: compress from a 3,328-token cache at 0.5
    read = base.decode_budget + base.decode_query_blocks * 8
    assert not decode_pays(2 * read - 1, base.decode_budget, base.decode_query_blocks, base.decode_max_read)
    assert decode_pays(2 * read, base.decode_budget, base.decode_query_blocks, base.decode_max_read)
    assert decode_pays(read, 512, 144, 1.0) and not decode_pays(read - 1, 512, 144, 1.0)
    assert not decode_pays(10 ** 9, 512, 144, 0.0)
    with pytest.raises(ValueError, match="decode_max_read"):
        decode_pays(4000, 512, 144, 1.5)


def test_per_request_decode_max_interval():
    base = LoopServeConfig()
    assert base.override({"decode_max_interval": 64}).decode_max_interval == 64
    assert base.override({"decode_interval": 16, "decode_max_interval": 16}).decode_max_interval == 16
    with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_max_interval"):
        base.override({"decode_max_interval": 4}, request_field_name)
    with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.min_prefill_len"):
        base.override({"min_prefill_len": -5}, request_field_name)


def test_per_request_decode_seed():
    base = LoopServeConfig()
    assert base.decode_seed == "auto"
    assert base.override({"decode_seed": "last_queries"}).decode_seed == "last_queries"
    for bad in ("snapkv", 1, None):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_seed"):
            base.override({"decode_seed": bad}, request_field_name)


def test_per_request_decode_first_interval():
    base = LoopServeConfig()
    assert base.decode_first_interval == 4  # early: each step's query blocks cover what the first choice misses
    assert base.override({"decode_first_interval": 16}).decode_first_interval == 16
    assert base.override({"decode_first_interval": None}).decode_first_interval is None  # the base interval
    for bad in (0, -3, 2.5, "4", True):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_first_interval"):
            base.override({"decode_first_interval": bad}, request_field_name)


def test_per_request_decode_pooling():
    base = LoopServeConfig()
    assert base.decode_pooling == "bounds"
    assert base.override({"decode_pooling": "all"}).decode_pooling == "all"
    for bad in ("mean", 1, None, True):
        with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.decode_pooling"):
            base.override({"decode_pooling": bad}, request_field_name)


@pytest.mark.parametrize("field,value", BAD_FLAG_VALUES)
def test_each_invalid_flag_stops_startup_naming_it(field, value, capsys, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    called = []
    argv = ["--model-path", "m", "--enable-loopserve", FLAGS[field], value]
    with pytest.raises(SystemExit) as exc:
        plugin._around_prepare_server_args(lambda a: called.append(a), argv)
    assert exc.value.code == 2
    assert FLAGS[field] in capsys.readouterr().err
    assert not called  # SGLang never started
    assert CONFIG_ENV not in __import__("os").environ


def test_non_numeric_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        plugin.parse_flags(["--loopserve-decode-budget", "many"])
    assert "--loopserve-decode-budget" in capsys.readouterr().err


def test_flags_reach_children_through_the_environment(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)

    class Args:
        device = "cpu"
        enable_metrics = True

    argv = ["--model-path", "m", "--enable-loopserve", "--loopserve-alpha", "0.9",
            "--loopserve-decode-budget", "256"]
    got = plugin._around_prepare_server_args(lambda a: Args(), argv)
    assert isinstance(got, Args)
    settings = plugin.LaunchSettings.from_env()
    assert settings.config == LoopServeConfig(alpha=0.9, decode_budget=256)
    assert settings.enable_metrics is True
    # Without the flag, LoopServe is off in every process: hooks return at once.
    plugin._around_prepare_server_args(lambda a: Args(), ["--model-path", "m"])
    assert CONFIG_ENV not in __import__("os").environ


def test_request_overrides_are_validated_naming_the_field():
    base = LoopServeConfig()
    assert plugin.request_options({"loopserve": {"alpha": 0.8}}, base).alpha == 0.8
    assert plugin.request_options({"other": 1}, base) is base
    assert plugin.request_options(None, base) is base
    for bad, field in [({"alpha": 1.5}, "alpha"), ({"alpha": "high"}, "alpha"),
                       ({"decode_budget": 0}, "decode_budget"), ({"enabled": "no"}, "enabled"),
                       ({"block_size": 32}, "block_size"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(LoopServeConfigError) as exc:
            plugin.request_options({"loopserve": bad}, base)
        assert request_field_name(field) in str(exc.value)
    with pytest.raises(ValueError, match="custom_params.loopserve must be an object"):
        plugin.request_options({"loopserve": 0.5}, base)


def test_endpoint_adds_settings_to_every_request_body():
    from sglang_loopserve.frontends import LoopServeEndpoint

    ep = LoopServeEndpoint.__new__(LoopServeEndpoint)
    ep.loopserve = {"enabled": False}

    class S:
        images_ = []

    data = {"text": "x", "sampling_params": {"max_new_tokens": 3, "custom_params": {"k": 1}}}
    ep._add_images(S(), data)
    assert data["sampling_params"]["custom_params"] == {"k": 1, "loopserve": {"enabled": False}}
    assert "session_id" not in data
    ep.session_id = "conversation-1"  # SGLang's radix-native sessions: a top-level field
    ep._add_images(S(), data)
    assert data["session_id"] == "conversation-1"
    with pytest.raises(LoopServeConfigError, match="custom_params.loopserve.alpha"):
        LoopServeEndpoint("http://127.0.0.1:9", loopserve={"alpha": 2.0})


def test_stats_summary_means():
    s = RequestStats(num_layers=2)
    s.add_prefill(computed=30, causal=100, sparse=True, select_s=0.5)
    s.add_prefill(computed=100, causal=100, sparse=False)
    for _ in range(3):  # 3 steps x 2 layers
        s.add_decode(attended=10, cached=40)
        s.add_decode(attended=20, cached=40)
    out = s.summary()
    assert out["prefill_density"] == pytest.approx(0.65)
    assert out["prefill_sparse_fraction"] == 0.5
    assert out["decode_steps"] == 3
    assert out["decode_tokens_attended"] == pytest.approx(15)
    assert out["decode_tokens_cached"] == 40
    json.dumps(out)  # travels in meta_info


def test_radix_namespace_separates_approximate_kv(monkeypatch):
    from sglang_loopserve.srt import request_state

    monkeypatch.setattr(request_state, "_context", [8192])
    base = LoopServeConfig()
    assert plugin.cache_namespace(base.override({"enabled": False})) is None
    assert plugin.cache_namespace(base.override({"alpha": 1.0, "decode_budget": 8192})) is None
    ns = {plugin.cache_namespace(base), plugin.cache_namespace(base.override({"alpha": 0.8})),
          plugin.cache_namespace(base.override({"alpha": 1.0}))}  # decode still compressed
    assert None not in ns and len(ns) == 3
    # every setting a request may change, but enabled, changes the attention and so the namespace
    other = {"method": "snapkv", "alpha": 0.5, "q_window": 32, "min_prefill_len": 7, "decode_budget": 300,
             "decode_interval": 8, "decode_window": 4, "decode_max_interval": 256, "decode_seed": "full",
             "decode_first_interval": 2, "decode_pooling": "none", "decode_query_blocks": 3,
             "decode_pyramid": 0.1, "decode_max_read": 0.9, "decode_min_len": 9, "sink": 5, "recent": 30}
    assert set(other) == set(LoopServeConfig.REQUEST_FIELDS) - {"enabled"}
    for field, value in other.items():
        assert plugin.cache_namespace(base.override({field: value})) != plugin.cache_namespace(base), field


@pytest.fixture
def sglang_prepare(monkeypatch):
    """SGLang's own ``prepare_server_args`` with LoopServe's flags added, as the plugin's
    hook on ``ServerArgs.add_cli_args`` does in a server (undone after the test)."""
    from sglang.srt import server_args

    add = server_args.ServerArgs.add_cli_args

    def add_with_loopserve(parser):
        result = add(parser)
        plugin._on_add_cli_args(result, parser)
        return result

    monkeypatch.setattr(server_args.ServerArgs, "add_cli_args", staticmethod(add_with_loopserve))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    fn = server_args.prepare_server_args
    return getattr(fn, "__wrapped__", fn)


@pytest.mark.parametrize("extra,decode", [
    ([], "disabled"),  # SGLang's default decode graphs: turned off
    (["--cuda-graph-backend-prefill", "breakable"], "disabled"),
    (["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"], "disabled"),
])
def test_gpu_launch_runs_attention_outside_cuda_graphs(extra, decode, sglang_prepare, model_path):
    """On a GPU device SGLang is started with decode CUDA graphs off (SGLang's real argument parsing)."""
    argv = ["--model-path", str(model_path), "--device", "cuda", "--enable-loopserve", *extra]
    got = plugin._around_prepare_server_args(sglang_prepare, argv)
    assert plugin.graph_backends(got)["decode"] == decode
    assert plugin.graph_backends(got)["prefill"] in (None, "breakable", "disabled")


@pytest.mark.parametrize("extra,message", [
    (["--cuda-graph-backend-prefill", "full"], "full prefill CUDA graph"),
    (["--cuda-graph-config", '{"decode": {"backend": "full"}}'], "--cuda-graph-config"),
    (["--cuda-graph-config", '{"prefill": {"backend": "full"}}'], "full prefill CUDA graph"),
])
def test_gpu_launch_refuses_captured_attention(extra, message, sglang_prepare, model_path):
    argv = ["--model-path", str(model_path), "--device", "cuda", "--enable-loopserve", *extra]
    with pytest.raises(SystemExit, match="enable-loopserve") as exc:
        plugin._around_prepare_server_args(sglang_prepare, argv)
    assert message in str(exc.value)
    assert CONFIG_ENV not in __import__("os").environ


def test_flag_help_renders():
    """argparse formats help strings with %: a literal % in a help text breaks --help."""
    import argparse

    parser = argparse.ArgumentParser()
    plugin.add_flags(parser)
    text = parser.format_help()
    for flag in FLAGS.values():
        assert flag in text, flag
