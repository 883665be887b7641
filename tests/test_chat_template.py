"""The frontends and the benchmark frame prompts with the served model's own chat template,
whatever its folder is called."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sglang.lang.chat_template import get_chat_template

from sglang_loopserve.bench import runner
from sglang_loopserve.frontends import chat_template
from sglang_loopserve.frontends.endpoint import LoopServeEndpoint

#: Framing no name-matching could guess: the runner must take it from the folder.
PLANTED = ("{% for m in messages %}[[{{ m['role'] | upper }}]]{{ m['content'] }}[[/{{ m['role'] | upper }}]]\n"
           "{% endfor %}{% if add_generation_prompt %}[[ASSISTANT]]{% endif %}")


@pytest.fixture
def planted_folder(tmp_path, model_path):
    folder = tmp_path / "my-finetune-7"  # a name that matches none of SGLang's templates
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / name, folder / name)
    (folder / "chat_template.jinja").write_text(PLANTED)
    return folder


@pytest.fixture
def model_info_server(planted_folder):
    """Answers ``/get_model_info`` as an SGLang server serving ``planted_folder`` would."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = json.dumps({"model_path": str(planted_folder), "is_generation": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_smollm2_own_template_is_chatml(model_path):
    derived = chat_template.derive(chat_template.tokenizer_render(model_path))
    assert derived.role_prefix_and_suffix == get_chat_template("chatml").role_prefix_and_suffix
    assert derived.stop_str == ("<|im_end|>",)


def test_runner_prompt_is_the_planted_template(model_info_server, planted_folder, monkeypatch):
    from transformers import AutoTokenizer

    sent = []

    def generate(self, s, sampling_params):
        sent.append((s.text_, self.loopserve))
        return "an answer", {"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 0,
                             "client": {"time_to_first_token_s": 0.1, "decode_s": 0.1}}

    monkeypatch.setattr(LoopServeEndpoint, "generate", generate)
    ask = runner.server_ask(model_info_server)
    got = ask([("first question", "first answer")], "second question", 8, {"method": "snapkv", "decode_budget": 900})
    assert got["answer"] == "an answer"
    (text, settings), = sent
    messages = [{"role": "system", "content": runner.SYSTEM_PROMPT},
                {"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}]
    want = AutoTokenizer.from_pretrained(str(planted_folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert text == want
    assert text.startswith("[[SYSTEM]]") and text.endswith("[[/USER]]\n[[ASSISTANT]]")
    assert settings == {"method": "snapkv", "decode_budget": 900}


def test_unusable_template_falls_back_to_sglang_by_path(tmp_path, planted_folder, caplog):
    # Opens with the message count, so adding a message rewrites the start: not expressible as
    # role prefixes and suffixes.
    (planted_folder / "chat_template.jinja").write_text(
        "{{ messages | length }} messages:{% for m in messages %} {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(chat_template.ChatTemplateError, match="prefix-stable"):
        chat_template.derive(chat_template.tokenizer_render(planted_folder))
    chat_template.for_model.cache_clear()
    fallback = chat_template.for_model(str(planted_folder))
    assert fallback.name == "default" and "using SGLang's 'default' by path" in caplog.text
    chat_template.for_model.cache_clear()
