"""The embedded model served on this CPU by SGLang with the LoopServe platform."""

from __future__ import annotations

import requests

CHAT = "/v1/chat/completions"


def chat(server, messages, **kw):
    body = {"model": "default", "messages": messages, "temperature": 0, "max_tokens": 32, **kw}
    return requests.post(server.url + CHAT, json=body, timeout=300)


def generate(server, text, **sampling):
    params = {"max_new_tokens": 32, "temperature": 0, **sampling}
    r = requests.post(server.url + "/generate", json={"text": text, "sampling_params": params},
                      timeout=300)
    r.raise_for_status()
    return r.json()


def test_capital_of_france(server):
    r = chat(server, [{"role": "user", "content": "What is the capital of France?"}])
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_second_turn_hits_radix_cache(server, tokenizer):
    history = [
        {"role": "system", "content": "You are a geography tutor. " * 20},
        {"role": "user", "content": "Name a large river in Europe."},
    ]
    text1 = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    first = generate(server, text1)
    history += [{"role": "assistant", "content": first["text"]},
                {"role": "user", "content": "Which countries does it flow through?"}]
    text2 = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    second = generate(server, text2)
    assert second["meta_info"]["prompt_tokens"] > first["meta_info"]["prompt_tokens"]
    # Radix reuse: at least the whole first prompt comes from the cache.
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 1


def test_request_longer_than_context_is_400_then_serving_continues(server):
    r = chat(server, [{"role": "user", "content": "word " * 9000}])
    assert r.status_code == 400
    assert "context length" in r.json()["message"]
    r = requests.post(server.url + "/generate", timeout=60,
                      json={"text": "word " * 9000, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400 and "context length" in r.text
    ok = chat(server, [{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_negative_max_tokens_is_400_then_serving_continues(server):
    r = chat(server, [{"role": "user", "content": "hi"}], max_tokens=-1)
    assert r.status_code == 400
    assert "max_new_tokens" in r.json()["message"]
    r = requests.post(server.url + "/generate", timeout=60,
                      json={"text": "hi", "sampling_params": {"max_new_tokens": -5}})
    assert r.status_code == 400 and "max_new_tokens" in r.text
    ok = generate(server, "The capital of France is", max_new_tokens=4)
    assert ok["meta_info"]["completion_tokens"] == 4


def test_served_with_cpu_platform_and_bounded_pool(server):
    info = requests.get(server.url + "/server_info", timeout=30).json()
    assert info["device"] == "cpu"
    assert info["attention_backend"] == "torch_native"
    assert info["max_total_num_tokens"] <= 32768
