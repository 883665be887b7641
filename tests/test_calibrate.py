"""``calibrate``: planted timings give the expected gates; a cached calibration is reused, a changed
machine key measures again; flags override measured gates; a real (small) measurement runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sglang_loopserve import calibrate as cal
from sglang_loopserve.config import LoopServeConfig


def prefill_row(length, exact, plan, kernel, dense_kernel, density=0.2):
    return {"length": length, "exact_s": exact, "plan_s": plan, "kernel_s": kernel,
            "dense_kernel_s": dense_kernel, "planned_density": density}


def decode_row(cached, base, **steps):
    return {"cached": cached, "base_s": base, "reselect_s": 0.0, "steps": steps}


def exact_row(cached, base, **reads_all):
    return {"cached": cached, "base_s": base, "reads_all": reads_all}


#: Prefill: at TYPICAL_DENSITY (0.4) the kernel costs k0 + (k1 - k0) x 0.25, so plan + kernel over
#: exact is 1.30 at 2K, 0.95 at 4K, 0.85 at 8K: it pays (0.9) from the crossing, 4096 + 4096 x
#: 0.05 / 0.10 = 6144.  The kernel alone matches the exact rectangle at 8K at a density of
#: 0.2 + (160 - 64) x 0.8 / 256 = 0.5.  Decode: the loops are the faster kernel at 8K (3.0 against
#: 3.5); over stock they cost 1.5 / 0.8 / 0.375, crossing 0.9 at 2048 + 2048 x 0.6 / 0.7 = 3803.4,
#: rounded up to 3840.
PLANTED = {
    "prefill": [prefill_row(2048, 10.0, 5.0, 4.0, 20.0), prefill_row(4096, 40.0, 6.0, 16.0, 80.0),
                prefill_row(8192, 160.0, 8.0, 64.0, 320.0)],
    "decode": [decode_row(2048, 2.0, tensor=2.5, loops=3.0), decode_row(4096, 4.0, tensor=3.0, loops=3.2),
               decode_row(8192, 8.0, tensor=3.5, loops=3.0)],
    # Exact decode: the loops (the chosen kernel) reading everything cost 1.2 / 1.0 / 0.6 of stock's
    # step at 256 / 1024 / 2048: 0.9 is crossed at 1024 + 1024 x 0.1 / 0.4 = 1280.
    "exact": [exact_row(256, 1.0, tensor=0.5, loops=1.2), exact_row(1024, 2.0, tensor=1.0, loops=2.0),
              exact_row(2048, 4.0, tensor=2.0, loops=2.4)],
}


def test_planted_timings_give_the_expected_gates():
    gates = cal.gates_from_timings(PLANTED)
    assert gates == cal.Gates(min_prefill_len=6144, prefill_max_density=0.5, decode_min_len=3840,
                              decode_kernel="loops", exact_decode_min_len=1280, source="measured")


def test_exact_decode_stays_on_the_base_path_unless_the_kernel_pays():
    """Judged with the compressed step's kernel (the tensor path's cheaper full reads do not count);
    without exact rows (an older measurement), or losing at the longest length, never."""
    t = json.loads(json.dumps(PLANTED))
    t["exact"][-1]["reads_all"]["loops"] = 3.8  # 0.95 of stock at 2K
    assert cal.gates_from_timings(t).exact_decode_min_len == cal.NEVER
    del t["exact"]
    assert cal.gates_from_timings(t).exact_decode_min_len == cal.NEVER


def test_a_path_that_never_pays_is_never_taken():
    slow = json.loads(json.dumps(PLANTED))
    for row in slow["prefill"]:
        row["plan_s"] = row["exact_s"]  # planning alone costs the exact rectangle
    for row in slow["decode"]:
        row["steps"] = {"tensor": row["base_s"] * 0.95}  # 0.95: saves less than MARGIN asks
    gates = cal.gates_from_timings(slow)
    assert gates.min_prefill_len == cal.NEVER and gates.decode_min_len == cal.NEVER
    assert "sparse prefill never" in gates.describe() and "compressed decode never" in gates.describe()


def test_a_gate_starts_where_the_path_pays_through_the_longest_length():
    """Paying at every length: the shortest; paying at 2K, losing at 4K, paying at 8K: past 4K."""
    assert cal._first_paying([(2048, 0.5), (4096, 0.6), (8192, 0.7)]) == 2048
    assert cal._first_paying([(2048, 0.5), (4096, 1.1), (8192, 0.7)]) == 6144  # 4096 + 4096 x 0.2 / 0.4
    assert cal._first_paying([(2048, 0.5), (4096, 0.95)]) == cal.NEVER
    # Any order; 4096 + 4096 x 0.1 / 0.15 = 6826.7, rounded up to 6912.
    assert cal._first_paying([(4096, 1.0), (2048, 2.0), (8192, 0.85)]) == 6912


def test_the_density_gate_is_where_the_kernel_costs_the_exact_rectangle():
    t = json.loads(json.dumps(PLANTED))
    t["prefill"][-1]["dense_kernel_s"] = 100.0  # cheaper than exact even at every block
    assert cal.gates_from_timings(t).prefill_max_density == 1.0
    t["prefill"][-1]["kernel_s"] = 200.0  # dearer than exact at the plan's own 0.2: proportionally less
    t["prefill"][-1]["dense_kernel_s"] = 1000.0
    gates = cal.gates_from_timings(t)
    assert gates.prefill_max_density == pytest.approx(0.16)
    assert gates.min_prefill_len == cal.NEVER  # and the kernel never pays at a served density


def key(**changes):
    base = cal.MachineKey(device="cpu", cpu_flags=("avx2",), threads=2, isa_caps=(), dtype="float32",
                          kv_dtype="float32", torch="2.9.1", heads=(9, 3, 64), block_size=64)
    return dataclasses.replace(base, **changes)


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return json.loads(json.dumps({**PLANTED, "seconds": 1.5}))


def test_a_cached_calibration_is_reused_and_a_changed_machine_key_measures_again(tmp_path):
    measure = Counting()
    first, _ = cal.calibrated_gates(key(), measure, "auto", root=tmp_path)
    assert measure.calls == 1 and first.source == "measured"
    again, timings = cal.calibrated_gates(key(), measure, "auto", root=tmp_path)
    assert measure.calls == 1 and again == dataclasses.replace(first, source="cached")
    assert timings["decode"] == PLANTED["decode"]
    for changed in (key(cpu_flags=("avx2", "avx512f", "avx512_bf16")), key(dtype="bfloat16"), key(heads=(14, 2, 64)),
                    key(isa_caps=("ATEN_CPU_CAPABILITY=avx2",)), key(torch="2.10.0"), key(threads=16)):
        cal.calibrated_gates(changed, measure, "auto", root=tmp_path)
    assert measure.calls == 7 and len(list(tmp_path.glob("*.json"))) == 7
    cal.calibrated_gates(key(), measure, "measure", root=tmp_path)  # asked to measure again
    assert measure.calls == 8
    gates, timings = cal.calibrated_gates(key(), measure, "off", root=tmp_path)
    assert gates == cal.SAFE_GATES and timings == {} and measure.calls == 8


def test_an_unreadable_calibration_is_measured_again(tmp_path):
    path = cal.cache_path(key(), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    measure = Counting()
    gates, _ = cal.calibrated_gates(key(), measure, "auto", root=tmp_path)
    assert measure.calls == 1 and gates.source == "measured"
    assert json.loads(path.read_text())["gates"]["decode_min_len"] == 3840


def test_the_machine_key_follows_the_isa_caps_and_the_dtype(monkeypatch):
    for var in cal.ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    plain = cal.MachineKey.of("cpu", torch.float32, torch.float32, (9, 3, 64), 64)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = cal.MachineKey.of("cpu", torch.float32, torch.float32, (9, 3, 64), 64)
    assert capped.isa_caps == ("ATEN_CPU_CAPABILITY=avx2",) and capped.digest() != plain.digest()
    assert cal.MachineKey.of("cpu", torch.bfloat16, torch.bfloat16, (9, 3, 64), 64).digest() != capped.digest()


def test_flags_override_measured_gates(tmp_path, monkeypatch):
    measured = cal.gates_from_timings(PLANTED)
    assert cal.with_flags(measured, LoopServeConfig()) == measured  # nothing set: measured
    config = LoopServeConfig(min_prefill_len=1000, decode_kernel="tensor")
    flagged = cal.with_flags(measured, config)
    assert (flagged.min_prefill_len, flagged.decode_kernel, flagged.source) == (1000, "tensor", "measured+flags")
    assert (flagged.prefill_max_density, flagged.decode_min_len) == (0.5, 3840)  # the rest measured
    # Through the server's entry point, from a cached calibration of this machine's key.
    monkeypatch.setattr(cal, "measure", lambda *a, **k: Counting()())
    config = LoopServeConfig(decode_min_len=0, prefill_max_density=0.25, exact_decode_min_len=cal.NEVER)
    gates = cal.gates_for("cpu", torch.float32, torch.float32, (9, 3, 64), config, root=tmp_path)
    assert (gates.decode_min_len, gates.prefill_max_density, gates.min_prefill_len) == (0, 0.25, 6144)
    assert gates.exact_decode_min_len == cal.NEVER  # measured: 1280
    assert gates.source == "measured+flags"
    assert cal.gates_for("cpu", torch.float32, torch.float32, (9, 3, 64), config, root=tmp_path).source == \
        "cached+flags"


def test_bad_gate_flags_are_refused():
    from sglang_loopserve.config import LoopServeConfigError

    for field, value in (("decode_kernel", "fastest"), ("calibration", "sometimes"), ("prefill_max_density", 1.5),
                         ("decode_min_len", -1), ("exact_decode_min_len", -5)):
        with pytest.raises(LoopServeConfigError, match=field):
            LoopServeConfig(**{field: value}).validated()


def test_a_small_measurement_times_both_sides_of_every_gate():
    config = LoopServeConfig(q_window=16, block_size=16, decode_budget=64, decode_query_blocks=4, decode_window=4,
                             decode_interval=8)
    t = cal.measure((4, 2, 32), torch.float32, torch.float32, "cpu", config, prefill_lengths=(256, 512),
                    decode_lengths=(512, 1024), exact_lengths=(256, 1024), repeats=1)
    assert [r["length"] for r in t["prefill"]] == [256, 512] and [r["cached"] for r in t["decode"]] == [512, 1024]
    assert [r["cached"] for r in t["exact"]] == [256, 1024]
    for row in t["exact"]:
        assert row["base_s"] > 0 and set(row["reads_all"]) == set(cal.decode_kernels("cpu", torch.float32,
                                                                                     torch.float32))
    for row in t["prefill"]:
        assert all(row[f] > 0 for f in ("exact_s", "plan_s", "kernel_s", "dense_kernel_s"))
        assert 0 < row["planned_density"] <= 1
    for row in t["decode"]:
        assert row["base_s"] > 0 and set(row["steps"]) == set(cal.decode_kernels("cpu", torch.float32, torch.float32))
    gates = cal.gates_from_timings(t)
    assert gates.decode_kernel in t["decode"][0]["steps"] and 0 <= gates.prefill_max_density <= 1
    table = cal.format_timings(t)
    assert len(table.splitlines()) == 3 * (2 + 2) and "stock ms" in table  # three tables: two headers, two rows


def test_processes_of_one_machine_measure_once(tmp_path):
    """Two ranks starting together: one measures (the other waits on the lock), both get its gates."""
    import threading
    import time as _time

    calls = []

    def slow_measure():
        calls.append(1)
        _time.sleep(0.3)
        return Counting()()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cal.calibrated_gates(key(), slow_measure, "auto",
                                                                                     root=tmp_path)[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and sorted(g.source for g in results) == ["cached", "measured"]
    assert results[0].decode_min_len == results[1].decode_min_len == 3840
