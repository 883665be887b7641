"""The text the benchmark's conversations are built from, frozen in a committed snapshot.

Facts come from Python packages' metadata (name, version, summary, license,
requirements, topic classifiers, the start of the long description: real,
human-written text with exact answers); filler paragraphs from Python's
reference documentation (``pydoc_data.topics``).  Read live, both change with
the Python and packages a machine has, and so would every conversation; so
the builder reads ``data/snapshot.json.gz`` (about 0.4 MB, in the package),
and a seed gives byte-identical conversations on every machine.

``python -m sglang_loopserve.bench.sources --out FILE`` takes a new snapshot
from this machine (the installed distributions and this Python's topics); a
new snapshot makes new conversations, so results name the snapshot's sha256.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib.metadata
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("data") / "snapshot.json.gz"
#: Words of a package's long description kept: the most any data set reads (summaries: 400).
DESCRIPTION_WORDS = 400
SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    summary: str
    license: str
    requires: tuple[str, ...]
    topics: tuple[str, ...]
    description: str

    def paragraph(self, words: int = 120) -> str:
        """How a package is described in a document: its facts, then the start of its description."""
        text = " ".join(self.description.split()[:words])
        facts = [f"The Python package {self.name}, version {self.version}: {self.summary.rstrip('.')}."]
        if self.license:
            facts.append(f"It is distributed under the {self.license} license.")
        if self.requires:
            facts.append(f"It requires {', '.join(self.requires[:4])}.")
        return " ".join(facts) + " " + text


@dataclass(frozen=True)
class Sources:
    packages: tuple[Package, ...]
    filler: tuple[str, ...]
    sha256: str  # of the snapshot file's decompressed JSON


@functools.lru_cache(maxsize=4)
def load(path: Path | str = SNAPSHOT) -> Sources:
    """The snapshot at ``path`` (default: the committed one)."""
    raw = gzip.decompress(Path(path).read_bytes())
    data = json.loads(raw)
    if data.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"{path}: snapshot version {data.get('version')!r}, this code reads {SNAPSHOT_VERSION}")
    pk = tuple(Package(p["name"], p["version"], p["summary"], p["license"], tuple(p["requires"]),
                       tuple(p["topics"]), p["description"]) for p in data["packages"])
    return Sources(pk, tuple(data["filler"]), hashlib.sha256(raw).hexdigest())


# ------------------------------------------------------------------ taking a snapshot
def _license(meta) -> str:
    lic = (meta.get("License-Expression") or meta.get("License") or "").strip()
    if lic and len(lic) <= 40 and "\n" not in lic and lic.upper() != "UNKNOWN":
        return lic
    for c in meta.get_all("Classifier") or []:
        if c.startswith("License :: OSI Approved :: "):
            return c.rsplit(" :: ", 1)[1].replace(" License", "")
    return ""


def installed_packages() -> tuple[Package, ...]:
    """This environment's distributions with a summary and a description of some length, by name."""
    seen: dict[str, Package] = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        name, summary = meta.get("Name"), (meta.get("Summary") or "").strip()
        body = meta.get_payload() or meta.get("Description") or ""
        body = re.sub(r"[#*`=\-_~<>\[\]|]+", " ", body)  # markdown/rst markup is noise to a reader
        if not name or not summary or len(body.split()) < 60 or "\n" in summary:
            continue
        requires = []
        for r in dist.requires or []:
            if "extra ==" in r:
                continue
            req = re.match(r"[A-Za-z0-9._-]+", r)
            if req and req.group(0).lower() not in (x.lower() for x in requires):
                requires.append(req.group(0))
        topics = tuple(sorted({c.split(" :: ")[1] for c in meta.get_all("Classifier") or []
                               if c.startswith("Topic :: ") and len(c.split(" :: ")) > 1}))
        key = name.lower().replace("_", "-")
        seen.setdefault(key, Package(name, meta.get("Version") or "", summary, _license(meta), tuple(requires),
                                     topics, " ".join(body.split()[:DESCRIPTION_WORDS])))
    return tuple(seen[k] for k in sorted(seen))


def documentation_paragraphs() -> tuple[str, ...]:
    """Paragraphs of this Python's reference documentation (topics in a fixed order)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            if len(para.split()) >= 25:
                out.append(para)
    return tuple(out)


def take_snapshot(out: Path) -> str:
    """Write this machine's sources to ``out``; returns the sha256 ``load`` will report."""
    data = {"version": SNAPSHOT_VERSION,
            "packages": [dict(asdict(p), requires=list(p.requires), topics=list(p.topics))
                         for p in installed_packages()],
            "filler": list(documentation_paragraphs())}
    raw = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    return hashlib.sha256(raw).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.bench.sources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to write the new snapshot (.json.gz)")
    a = p.parse_args(argv)
    sha = take_snapshot(a.out)
    s = load(a.out)
    print(f"{a.out}: {len(s.packages)} packages, {len(s.filler)} filler paragraphs, sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
