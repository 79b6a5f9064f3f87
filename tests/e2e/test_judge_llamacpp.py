"""The judge against an independent OpenAI-compatible server: llama-cpp-python's, serving the
default model's GGUF. Needs `llama-cpp-python[server]` (in the `test` extra); without it this
fails, unless ALIGNKIT_SKIP_LLAMACPP=1 says to skip it on purpose."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from alignkit.eval.judge import OpenAIJudge, parse_verdict
from alignkit.eval.winrate import prompt_record, win_rate

# The real default model's GGUF, served by llama.cpp: a real-model test, outside the fast tier.
pytestmark = pytest.mark.e2e

STARTUP_S = 90
PROMPTS = ["What is the capital of France?", "Name a primary colour."]
MODEL_ANSWERS = ["The capital of France is Paris.", "Blue is a primary colour."]
REFERENCE_ANSWERS = ["I do not know.", "Green, maybe purple."]


def _require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    if os.environ.get("ALIGNKIT_SKIP_LLAMACPP") == "1":
        pytest.skip("llama-cpp-python is not installed (ALIGNKIT_SKIP_LLAMACPP=1)")
    pytest.fail(
        "llama-cpp-python is not installed: pip install -e '.[test]' builds it "
        "(or set ALIGNKIT_SKIP_LLAMACPP=1 to skip this test on purpose)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"llama_cpp.server did not answer within {STARTUP_S}s")


@pytest.fixture(scope="module")
def llama_url(smollm2_gguf, tmp_path_factory):
    _require_llama_cpp()
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2"]
    # its verbose log goes to a file: a pipe nobody reads would fill up and stall the server
    log = tmp_path_factory.mktemp("llama-cpp") / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_openai_client_against_llama_cpp(llama_url):
    client = openai.OpenAI(base_url=llama_url, api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    chunks = list(
        client.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=8, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_win_rate_with_llama_cpp_judge(llama_url):
    judge = OpenAIJudge(llama_url, "smollm2", retries=1, backoff_s=0.1, timeout_s=60)
    seen = []
    result = win_rate(PROMPTS, MODEL_ANSWERS, REFERENCE_ANSWERS, judge, on_record=seen.append)
    # A 135M judge may or may not answer in the format: whatever it said must be accounted for
    assert result.wins + result.losses + result.ties + result.unparseable == len(PROMPTS)
    assert result.n == result.wins + result.losses + result.ties
    assert seen == result.records
    for rec in result.records:
        verdicts = [parse_verdict(raw) for raw in rec["raw"]]
        assert verdicts == [rec["model_first"], rec["reference_first"]]
        again = prompt_record(rec["index"], rec["prompt"], *verdicts)
        assert (again["outcome"], again["score"]) == (rec["outcome"], rec["score"])
    if result.n:
        assert 0.0 <= result.ci_low <= result.win_rate <= result.ci_high <= 1.0
