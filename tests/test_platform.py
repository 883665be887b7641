"""The out-of-tree CPU platform: when it activates and what it sets."""

from __future__ import annotations

import importlib.metadata
import pkgutil
from types import SimpleNamespace

import pytest
import torch

from sglang_loopserve.srt import platform as lp


@pytest.fixture
def no_platform_env(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)


def test_entry_point_is_registered():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="sglang.srt.platforms")}
    assert lp.PLATFORM_NAME in eps
    assert eps[lp.PLATFORM_NAME].load() is lp.activate


def test_returns_nothing_when_cuda_available(monkeypatch, no_platform_env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lp.activate() is None


def test_activates_without_accelerator(monkeypatch, no_platform_env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("xpu", "npu", "mps"):
        if hasattr(torch, name):
            monkeypatch.setattr(getattr(torch, name), "is_available", lambda: False, raising=False)
    assert lp.activate() == lp.PLATFORM_QUALNAME


def test_explicit_selection_wins_over_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("SGLANG_PLATFORM", lp.PLATFORM_NAME)
    assert lp.activate() == lp.PLATFORM_QUALNAME


def test_other_platform_selected_leaves_us_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("SGLANG_PLATFORM", "someone_else")
    assert lp.activate() is None


def test_sglang_resolves_our_platform(monkeypatch, no_platform_env):
    """SGLang's own discovery picks the platform on this CPU machine."""
    from sglang.srt.platforms import _resolve_platform
    from sglang.srt.platforms.interface import SRTPlatform

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plat = _resolve_platform()
    assert type(plat).__qualname__ == "LoopServeCpuPlatform"
    assert isinstance(plat, SRTPlatform)
    assert plat.is_out_of_tree()
    assert plat.device_type == "cpu"
    assert plat.get_default_attention_backend() == "torch_native"
    assert not plat.capabilities.supports_triton and not plat.capabilities.graph_capture


def test_qualname_resolves_to_class():
    cls = pkgutil.resolve_name(lp.PLATFORM_QUALNAME)
    assert cls.__name__ == "LoopServeCpuPlatform"


@pytest.mark.parametrize(
    "given, expected",
    [
        (dict(attention_backend="intel_amx", dtype="auto"), ("torch_native", lp.default_cpu_dtype())),
        (dict(attention_backend=None, dtype="auto"), ("torch_native", lp.default_cpu_dtype())),
        (dict(attention_backend="flex_attention", dtype="float32"), ("flex_attention", "float32")),
    ],
)
def test_server_args_defaults(monkeypatch, given, expected):
    monkeypatch.delenv("SGLANG_LOOPSERVE_CPU_DTYPE", raising=False)
    args = SimpleNamespace(**given)
    pkgutil.resolve_name(lp.PLATFORM_QUALNAME)().apply_server_args_defaults(args)
    assert (args.attention_backend, args.dtype) == expected


def test_dtype_override_by_env(monkeypatch):
    monkeypatch.setenv("SGLANG_LOOPSERVE_CPU_DTYPE", "float32")
    args = SimpleNamespace(attention_backend=None, dtype="auto")
    pkgutil.resolve_name(lp.PLATFORM_QUALNAME)().apply_server_args_defaults(args)
    assert args.dtype == "float32"


@pytest.mark.parametrize("native, dtype", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native, dtype):
    """Emulated bf16 (an AVX2 CPU) made a prefill's linear layers 7x slower than fp32."""
    monkeypatch.delenv("SGLANG_LOOPSERVE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(lp, "cpu_has_native_bf16", lambda: native)
    args = SimpleNamespace(attention_backend=None, dtype="auto")
    pkgutil.resolve_name(lp.PLATFORM_QUALNAME)().apply_server_args_defaults(args)
    assert args.dtype == dtype


@pytest.mark.parametrize("sizes,cpus,expected", [
    ((1, 1), [0, 1], {}),  # one rank: SGLang binds it itself
    ((2, 1), [0, 1], {"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "OMP_NUM_THREADS": "1"}),
    ((1, 2), [0, 1, 2, 3, 4], {"SGLANG_CPU_OMP_THREADS_BIND": "0,1|2,3", "OMP_NUM_THREADS": "2"}),
    ((2, 2), [4, 5, 6, 7, 0, 1, 2, 3], {"SGLANG_CPU_OMP_THREADS_BIND": "0,1|2,3|4,5|6,7", "OMP_NUM_THREADS": "2"}),
])
def test_several_cpu_ranks_split_the_cores(sizes, cpus, expected):
    args = SimpleNamespace(dp_size=sizes[0], tp_size=sizes[1], pp_size=1, device="cpu")
    assert lp.cpu_rank_environment(args, environ={}, cpus=cpus) == expected


def test_cpu_ranks_keep_what_the_user_set_and_refuse_more_ranks_than_cores():
    args = SimpleNamespace(dp_size=2, tp_size=1, pp_size=1, device="cpu")
    assert lp.cpu_rank_environment(args, environ={"SGLANG_CPU_OMP_THREADS_BIND": "0|0"}, cpus=[0, 1]) == {}
    assert lp.cpu_rank_environment(args, environ={"OMP_NUM_THREADS": "2"}, cpus=[0, 1]) == {
        "SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
    with pytest.raises(SystemExit, match="--dp-size x --tp-size x --pp-size = 4 CPU ranks"):
        lp.cpu_rank_environment(SimpleNamespace(dp_size=4, tp_size=1, pp_size=1, device="cpu"), environ={},
                                cpus=[0, 1])


@pytest.mark.parametrize("config,tp,refused", [
    ({"num_attention_heads": 9, "num_key_value_heads": 3}, 3, None),  # SmolLM2-135M
    ({"num_attention_heads": 9, "num_key_value_heads": 3}, 2, "--tp-size 2 does not divide the model's 9 query "
                                                              "and 3 KV heads.*use --tp-size 3"),
    ({"num_attention_heads": 14, "num_key_value_heads": 2}, 2, None),  # Qwen2.5-Coder-0.5B
    ({"num_attention_heads": 14, "num_key_value_heads": 2}, 7, "use --tp-size 2$"),
    ({"text_config": {"num_attention_heads": 8}}, 4, None),  # a multimodal config; KV heads default to the heads
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, 3, "use --tp-size 5$"),
])
def test_a_tp_size_must_divide_the_query_and_kv_heads(config, tp, refused):
    args = SimpleNamespace(tp_size=tp, device="cpu", model_path="/nonexistent")
    if refused is None:
        lp.check_cpu_tensor_parallel(args, config)
    else:
        with pytest.raises(SystemExit, match=refused):
            lp.check_cpu_tensor_parallel(args, config)
    # Not this platform's limit elsewhere, and nothing to check without a config at hand.
    lp.check_cpu_tensor_parallel(SimpleNamespace(tp_size=tp, device="cuda", model_path="/nonexistent"), config)
    lp.check_cpu_tensor_parallel(args)
