"""A bounded soak of a LoopServe server: concurrent multi-turn chats, faults and bad input, with the
invariants checked at intervals and at the end.

    python benchmarks/soak.py                      # 10 minutes, 4 clients, its own server
    python benchmarks/soak.py --minutes 2 --clients 3 --url http://127.0.0.1:30000

Without ``--url`` it launches the embedded model on loopback with ``--enable-loopserve
--radix-eviction-policy loopserve`` and a KV pool of ``POOL_TOKENS`` (so the radix eviction prunes
and evicts), and stops it at the end. It stops by itself: after ``--minutes`` or
``--max-requests``, whichever comes first.

Each client holds conversations of 2-4 turns, each through one of: raw ``/generate`` (the chat
template applied here), the OpenAI chat endpoint (streamed or not) or an SGLang frontend program,
with random valid per-request LoopServe settings and method, and short or long turns. Mixed in:
client disconnects mid-stream, explicit aborts (``/abort_request``), prompts past the context and
malformed ``custom_params.loopserve`` values (``testing.fuzzed_settings``).

The checks (``violations`` lists each failure):
* every well-formed request got a complete answer (or, when aborted or disconnected on purpose,
  ended); every malformed or too-long one a 4xx naming what is wrong; nothing else;
* at each check the clients pause and, once the server is idle: it answers; the KV pool balances
  as SGLang's idle check counts it (available + evictable + protected = total), every request slot
  is free, the radix tree passes its ``sanity_check``, LoopServe tracks no request SGLang let go;
  a request with LoopServe off and one at keep-everything settings answer exactly as the first
  one with LoopServe off did, before any load.

Writes a JSON summary (``--out``): requests and errors by kind, invariant checks passed/failed,
the radix counters, the violations.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from sglang_loopserve.config import METHODS, LoopServeConfig
from sglang_loopserve.frontends import connect, python_docs, run_chat
from sglang_loopserve.server import loopserve_state
from sglang_loopserve.testing import fuzzed_settings

#: KV pool of the soak's server: about two long conversations, so conversations evict each other.
POOL_TOKENS = 6144
#: The embedded model's context (SmolLM2: 8192): a prompt past it must be refused.
CONTEXT_TOKENS = 8192
REQUEST_TIMEOUT_S = 300
REFERENCE = {"text": "<|im_start|>user\nList the days of the week.<|im_end|>\n<|im_start|>assistant\n",
             "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
KEEP_EVERYTHING = {"alpha": 1.0, "decode_budget": 1 << 20}


def server_args(extra=()) -> list[str]:
    return ["--enable-loopserve", "--radix-eviction-policy", "loopserve", *extra]


def server_state(url: str) -> dict:
    return loopserve_state(url)


def idle_problems(state: dict) -> list[str]:
    """What is wrong with an idle server's state (empty: nothing)."""
    check = state["idle_check"]
    problems = []
    if not check["kv_balanced"]:
        problems.append(f"KV pool unbalanced at idle: {check['kv']}")
    if check["req_slots_free"] != check["req_slots_total"]:
        problems.append(f"request slots leaked: {check['req_slots_free']} of {check['req_slots_total']} free")
    if check["radix_sanity"] != "ok":
        problems.append(f"radix tree sanity_check: {check['radix_sanity']}")
    if state["tracked_requests"] or state["stale_requests"]:
        problems.append(f"LoopServe tracks {state['tracked_requests']} requests at idle "
                        f"({state['stale_requests']} SGLang had let go)")
    return problems


def wait_idle(url: str, timeout_s: float = 120) -> dict:
    end = time.monotonic() + timeout_s
    while True:
        state = server_state(url)
        if state["idle_check"] is not None:
            return state
        if time.monotonic() > end:
            raise AssertionError(f"server not idle after {timeout_s} s")
        time.sleep(0.5)


def assert_idle(url: str) -> dict:
    state = wait_idle(url)
    assert idle_problems(state) == [], idle_problems(state)
    return state


def _reference_answer(url: str, loopserve: dict) -> str:
    body = dict(REFERENCE, sampling_params=dict(REFERENCE["sampling_params"],
                                                custom_params={"loopserve": loopserve}))
    r = requests.post(url + "/generate", json=body, timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    return r.json()["text"]


def random_settings(rng: random.Random) -> dict:
    """Valid per-request settings: a method and a few fields drawn at random."""
    choices = {"method": list(METHODS), "alpha": [0.5, 0.8, 0.9, 0.95, 1.0], "q_window": [16, 64, 128],
               "decode_budget": [64, 128, 512, 4096], "decode_interval": [4, 8, 32],
               "decode_seed": ["auto", "estimate", "last_queries", "full"], "decode_pooling": ["bounds", "all", "none"],
               "decode_query_blocks": [0, 16, 144], "decode_max_read": [0.5, 1.0], "recent": [8, 32]}
    picked = {k: rng.choice(v) for k, v in rng.sample(sorted(choices.items()), rng.randint(0, 4))}
    if picked.get("decode_interval", 32) > 32:
        picked["decode_max_interval"] = picked["decode_interval"]
    LoopServeConfig().override(picked)  # valid by construction; fail here, not on the server
    return picked


class Soak:
    def __init__(self, url: str, *, seconds: float, clients: int, seed: int, max_requests: int,
                 check_every_s: float, doc_tokens=(150, 600, 1500)):
        self.url, self.seconds, self.clients, self.max_requests = url, seconds, clients, max_requests
        self.check_every_s = check_every_s
        self.rng = random.Random(seed)
        self.requests = Counter()  # by kind
        self.outcomes = Counter()  # (kind, outcome)
        self.violations: list[str] = []
        self.checks = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.resume = threading.Event()
        self.resume.set()
        self.in_flight = 0
        self.docs = [python_docs(n) for n in doc_tokens]  # short and long turns
        self.malformed = [c for c in fuzzed_settings() if c.field is not None]
        from transformers import AutoTokenizer

        model_path = requests.get(url + "/model_info", timeout=60).json()["model_path"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.reference = None

    # ---------------------------------------------------------------- bookkeeping
    def _count(self, kind: str, outcome: str, problem: str | None = None):
        with self.lock:
            self.requests[kind] += 1
            self.outcomes[(kind, outcome)] += 1
            if problem:
                self.violations.append(f"{kind}: {problem}")
            if sum(self.requests.values()) >= self.max_requests:
                self.stop.set()

    def _request(self):
        """A context for one request: waits while a check runs, counts requests in flight."""
        soak = self

        class InFlight:
            def __enter__(self):
                soak.resume.wait()
                with soak.lock:
                    soak.in_flight += 1

            def __exit__(self, *exc):
                with soak.lock:
                    soak.in_flight -= 1

        return InFlight()

    # ---------------------------------------------------------------- clients
    def _messages(self, rng, turns):
        doc = rng.choice(self.docs)
        first = f"Read this documentation.\n\n{doc}\n\nWhat is it about?"
        follow = ["Name one function it describes.", "Summarise it in one line.", "Give an example call.",
                  f"Now read this too.\n\n{rng.choice(self.docs)}\n\nHow do the two differ?"]
        return [first] + rng.sample(follow, turns - 1)

    def _generate_turns(self, rng, messages, settings):
        history = []
        for message in messages:
            if self.stop.is_set():
                return
            history.append({"role": "user", "content": message})
            text = self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            params = {"max_new_tokens": rng.choice([8, 24, 48]), "temperature": 0,
                      "custom_params": {"loopserve": settings}}
            with self._request():
                r = requests.post(self.url + "/generate", json={"text": text, "sampling_params": params},
                                  timeout=REQUEST_TIMEOUT_S)
            answer = self._judge_answer("generate", r, lambda b: (b["text"], b["meta_info"]["finish_reason"]))
            if answer is None:
                return
            history.append({"role": "assistant", "content": answer})

    def _openai_turns(self, rng, messages, settings, stream):
        kind = "openai_stream" if stream else "openai_chat"
        history = []
        for message in messages:
            if self.stop.is_set():
                return
            history.append({"role": "user", "content": message})
            body = {"model": "default", "messages": history, "max_tokens": rng.choice([8, 24, 48]),
                    "temperature": 0, "stream": stream, "custom_params": {"loopserve": settings}}
            with self._request():
                r = requests.post(self.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S,
                                  stream=stream)
                if stream and r.status_code == 200:
                    answer, problem = _read_chat_stream(r)
                    self._count(kind, "answered" if problem is None else "broken", problem)
                    if problem is not None:
                        return
                    history.append({"role": "assistant", "content": answer})
                    continue
            answer = self._judge_answer(kind, r, lambda b: (b["choices"][0]["message"]["content"],
                                                            {"type": b["choices"][0]["finish_reason"]}))
            if answer is None:
                return
            history.append({"role": "assistant", "content": answer})

    def _frontend_turns(self, rng, messages, settings):
        try:
            with self._request():
                turns = run_chat(connect(self.url, loopserve=settings), messages, max_tokens=rng.choice([8, 24]))
            ok = len(turns) == len(messages) and all(t.completion_tokens > 0 for t in turns)
            self._count("frontend", "answered" if ok else "broken", None if ok else f"turns {turns}")
        except Exception as exc:  # noqa: BLE001 - a violation, recorded
            self._count("frontend", "broken", f"{type(exc).__name__}: {exc}"[:300])

    def _judge_answer(self, kind, r, read):
        """The answer text of a well-formed request, or None (recorded as a violation)."""
        if r.status_code != 200:
            self._count(kind, f"http_{r.status_code}", f"well-formed request got {r.status_code}: {r.text[:200]}")
            return None
        text, finish = read(r.json())
        if not isinstance(finish, dict) or finish.get("type") not in ("length", "stop"):
            self._count(kind, "unfinished", f"finish {finish}")
            return None
        self._count(kind, "answered")
        return text

    def _disconnect(self, rng):
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{rng.choice(self.docs)}\n\nExplain all of this in detail."}],
            tokenize=False, add_generation_prompt=True)
        body = {"text": text, "stream": True, "sampling_params": {
            "max_new_tokens": 200, "temperature": 0, "custom_params": {"loopserve": random_settings(rng)}}}
        with self._request():
            with requests.post(self.url + "/generate", json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= rng.randint(1, 4):
                        break  # the client goes away mid-generation
        self._count("disconnect", "dropped")

    def _abort(self, rng):
        rid = f"soak-abort-{rng.random()}"
        body = {"text": f"Write a long story about {rng.choice(['a cat', 'a ship', 'a clock'])}.", "rid": rid,
                "sampling_params": {"max_new_tokens": 300, "temperature": 0}}
        result = {}

        def send():
            result["r"] = requests.post(self.url + "/generate", json=body, timeout=REQUEST_TIMEOUT_S)

        with self._request():
            t = threading.Thread(target=send)
            t.start()
            time.sleep(rng.uniform(0.5, 3.0))
            requests.post(self.url + "/abort_request", json={"rid": rid}, timeout=60)
            t.join(REQUEST_TIMEOUT_S)
        r = result.get("r")
        if r is None:
            self._count("abort", "hung", "aborted request never returned")
            return
        finish = r.json().get("meta_info", {}).get("finish_reason", {}) if r.status_code == 200 else {}
        # Aborted, or done before the abort came; an abort may also end as an error status.
        ok = r.status_code == 200 and finish.get("type") in ("abort", "length", "stop") or 400 <= r.status_code < 600
        self._count("abort", "ended" if ok else "broken", None if ok else f"{r.status_code} {r.text[:200]}")

    def _too_long(self, rng):
        body = {"model": "default", "messages": [{"role": "user", "content": "word " * (CONTEXT_TOKENS + 100)}],
                "max_tokens": 8}
        with self._request():
            r = requests.post(self.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        ok = 400 <= r.status_code < 500 and "context" in r.text.lower()
        self._count("too_long", f"http_{r.status_code}", None if ok else f"{r.status_code} {r.text[:200]}")

    def _malformed(self, rng):
        case = rng.choice(self.malformed)
        body = {"text": "Say hello.", "sampling_params": {"max_new_tokens": 4,
                                                          "custom_params": {"loopserve": case.value}}}
        with self._request():
            r = requests.post(self.url + "/generate", data=json.dumps(body), timeout=REQUEST_TIMEOUT_S,
                              headers={"Content-Type": "application/json"})
        ok = 400 <= r.status_code < 500 and case.field in r.text
        self._count("malformed", f"http_{r.status_code}", None if ok else f"{case.value!r}: {r.status_code} "
                                                                       f"{r.text[:200]}")

    #: What a client does next, with its weight. Each client first does every move once, the quick
    #: ones first and the conversations from its own place in the list, so even a short soak has
    #: every kind.
    QUICK = (("disconnect", 1), ("malformed", 2), ("too_long", 1), ("abort", 1))
    CONVERSATIONS = (("generate", 3), ("openai_stream", 3), ("frontend", 2), ("openai_chat", 3))

    def _move(self, rng, move: str):
        if move in ("generate", "openai_chat", "openai_stream", "frontend"):
            messages, settings = self._messages(rng, rng.randint(2, 4)), random_settings(rng)
            if move == "generate":
                self._generate_turns(rng, messages, settings)
            elif move == "frontend":
                self._frontend_turns(rng, messages, settings)
            else:
                self._openai_turns(rng, messages, settings, stream=move == "openai_stream")
        else:
            getattr(self, "_" + move)(rng)

    def _client(self, index: int):
        rng = random.Random(self.rng.random() + index)
        names, weights = zip(*(self.QUICK + self.CONVERSATIONS))
        talks = [name for name, _ in self.CONVERSATIONS]
        first = index % len(talks)
        schedule = [name for name, _ in self.QUICK] + talks[first:] + talks[:first]
        while not self.stop.is_set():
            move = schedule.pop(0) if schedule else rng.choices(names, weights)[0]
            try:
                self._move(rng, move)
            except Exception as exc:  # noqa: BLE001 - a client-side error is a violation
                self._count(move, "client_error", f"{type(exc).__name__}: {exc}"[:300])

    # ---------------------------------------------------------------- checks
    def check(self, label: str):
        """Pause the clients, wait for idle, check every invariant, resume."""
        self.resume.clear()
        try:
            end = time.monotonic() + REQUEST_TIMEOUT_S
            while self.in_flight and time.monotonic() < end:
                time.sleep(0.2)
            problems = []
            try:
                if requests.get(self.url + "/health", timeout=60).status_code != 200:
                    problems.append("health check failed")
                state = wait_idle(self.url)
                problems += idle_problems(state)
                for name, loopserve in (("off", {"enabled": False}), ("keep-everything", KEEP_EVERYTHING)):
                    requests.post(self.url + "/flush_cache", timeout=60)
                    answer = _reference_answer(self.url, loopserve)
                    if answer != self.reference:
                        problems.append(f"{name} answer changed: {answer!r} != {self.reference!r}")
                problems += idle_problems(wait_idle(self.url))
            except Exception as exc:  # noqa: BLE001 - a dead or hung server is a failed check
                problems.append(f"{type(exc).__name__}: {exc}"[:300])
            self.checks["passed" if not problems else "failed"] += 1
            with self.lock:
                self.violations += [f"check {label}: {p}" for p in problems]
            print(f"[soak] check {label}: {'ok' if not problems else problems}", flush=True)
        finally:
            self.resume.set()

    def run(self) -> dict:
        requests.post(self.url + "/flush_cache", timeout=60)
        self.reference = _reference_answer(self.url, {"enabled": False})
        start = time.monotonic()
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        next_check = start + self.check_every_s
        while not self.stop.is_set() and time.monotonic() - start < self.seconds:
            time.sleep(1)
            if time.monotonic() >= next_check:
                self.check(f"at {time.monotonic() - start:.0f} s")
                next_check = time.monotonic() + self.check_every_s
        self.stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
            if t.is_alive():
                self.violations.append("a client hung past the request timeout")
        self.check("final")
        final = server_state(self.url)
        return {
            "seconds": round(time.monotonic() - start, 1), "clients": self.clients,
            "requests": sum(self.requests.values()), "requests_by_kind": dict(self.requests),
            "outcomes": {f"{k}:{o}": n for (k, o), n in sorted(self.outcomes.items())},
            "invariant_checks": {"passed": self.checks["passed"], "failed": self.checks["failed"]},
            "radix": final["radix"], "faults": final["faults"], "violations": self.violations,
        }


def _read_chat_stream(r) -> tuple[str, str | None]:
    """The streamed answer, and what is wrong with the stream (None: complete, with stats)."""
    text, finish, stats, done = [], None, None, False
    for line in r.iter_lines():
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return "", f"stream error {chunk['error']}"
        for choice in chunk.get("choices", []):
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
        stats = (chunk.get("sglext") or {}).get("loopserve", stats)
    if not done or finish not in ("length", "stop"):
        return "", f"stream ended without [DONE] or finish ({finish})"
    if stats is None:
        return "", "stream carried no sglext.loopserve"
    return "".join(text), None


def run(url: str, *, seconds: float = 600, clients: int = 4, seed: int = 0, max_requests: int = 5000,
        check_every_s: float = 120, out: Path | None = None, doc_tokens=(150, 600, 1500)) -> dict:
    summary = Soak(url, seconds=seconds, clients=clients, seed=seed, max_requests=max_requests,
                   check_every_s=check_every_s, doc_tokens=doc_tokens).run()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running LoopServe server (default: launch the embedded model)")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--check-every", type=float, default=120, help="seconds between invariant checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak/summary.json"))
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.max_requests < 1:
        p.error("--minutes must be > 0, --clients and --max-requests >= 1")
    kwargs = dict(seconds=args.minutes * 60, clients=args.clients, seed=args.seed, max_requests=args.max_requests,
                  check_every_s=args.check_every, out=args.out)
    if args.url:
        summary = run(args.url, **kwargs)
    else:
        from sglang_loopserve import models
        from sglang_loopserve.server import SGLangServer

        with SGLangServer(models.prepare(), max_total_tokens=POOL_TOKENS, extra_args=server_args(
                ["--loopserve-min-prefill-len", "1024", "--loopserve-decode-max-read", "1"]),
                log_path=args.out.parent / "server.log") as server:
            summary = run(server.url, **kwargs)
    print(json.dumps({k: v for k, v in summary.items() if k != "violations"}, indent=1))
    print(f"violations: {len(summary['violations'])}")
    for v in summary["violations"][:20]:
        print("  ", v)
    return 0 if not summary["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
