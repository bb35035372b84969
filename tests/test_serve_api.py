"""The HTTP API through FastAPI's TestClient: schema, streaming, batching, every error and limit path."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient

import tinygptv
from tinygptv.infer.chat import Conversation, Turn
from tinygptv.infer.engine import Engine
from tinygptv.infer.generate import GenerationConfig, generate_tokens
from tinygptv.serve.app import ServeSettings, create_app
from tinygptv.serve.protocol import Limits
from tinygptv.serve.testing import scripted_generate

URL = "/v1/chat/completions"
BOX_ANSWER = "<p>red box</p> {<10><20><60><80>}"


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(tinygptv.load("tiny", seed=1))


def client(engine, generate=None, **kw) -> TestClient:
    return TestClient(create_app(engine, ServeSettings(model_id="tiny", **kw), generate))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_message(text: str, image: Image.Image | None = None, url: str | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None or url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url or data_url(png(image))}})
    return [{"role": "user", "content": parts}]


RED = Image.new("RGB", (200, 100), (220, 20, 20))
BLUE = Image.new("RGB", (33, 50), (10, 20, 230))


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def engine_answer(engine, turns: list[Turn], max_new_tokens: int) -> str:
    request = Conversation(engine).request(turns)
    return engine.generate([request], GenerationConfig(max_new_tokens=max_new_tokens))[0].text


def test_non_stream_schema(engine):
    with client(engine) as c:
        r = c.post(URL, json={"model": "anything", "messages": image_message("what is it?", RED), "max_tokens": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["message"]["grounding"] == []
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 10
    prompt = engine.prompt_embeddings(engine.chat_request("what is it?", [RED]))[0]
    assert usage["prompt_tokens"] == prompt.shape[0]
    assert choice["message"]["content"] == engine_answer(engine, [Turn("what is it?", [RED])], 10)


def test_stream_schema_and_equals_non_stream(engine):
    messages = [{"role": "system", "content": "Be brief."}, *image_message("describe", BLUE),
                {"role": "assistant", "content": "a blue thing"}, {"role": "user", "content": "and the colour?"}]
    with client(engine) as c:
        plain = c.post(URL, json={"messages": messages, "max_tokens": 12}).json()
        r = c.post(URL, json={"messages": messages, "max_tokens": 12, "stream": True,
                              "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["choices"][0]["delta"] == {"grounding": []}
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[1:-2])
    assert streamed == plain["choices"][0]["message"]["content"]
    turns = [Turn("Be brief.\ndescribe", [BLUE], "a blue thing"), Turn("and the colour?")]
    assert streamed == engine_answer(engine, turns, 12)


def test_models_health_page_openapi(engine):
    with client(engine) as c:
        models = c.get("/v1/models").json()
        health = c.get("/health").json()
        page = c.get("/")
        schema = c.get("/openapi.json").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["context_length"] == 256
    assert health["status"] == "ok" and health["auth"] is False and health["queue"] == 0
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text  # offline page
    assert URL in schema["paths"] and "ChatCompletionRequest" in json.dumps(schema)


def test_grounding_field_from_scripted_answer(engine):
    with client(engine, scripted_generate(engine.tokenizer, BOX_ANSWER)) as c:
        r = c.post(URL, json={"messages": image_message("[grounding] the box", RED)})
        s = c.post(URL, json={"messages": image_message("[grounding] the box", RED), "stream": True})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == BOX_ANSWER
    expected = [{"x1": 20.0, "y1": 20.0, "x2": 120.0, "y2": 80.0, "label": "red box", "image": 0}]
    assert message["grounding"] == expected
    chunks = sse_events(s.text)[:-1]
    assert chunks[-1]["choices"][0]["delta"]["grounding"] == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len([ch for ch in chunks if ch["choices"][0]["delta"].get("content")]) > 3  # really streamed


def gated(generate=generate_tokens):
    """``generate`` whose first batch waits for the returned event; ``sizes`` records every batch size."""
    gate, sizes = threading.Event(), []

    def run(lm, prompts, cfg, eos_id, decode=None):
        sizes.append(len(prompts))
        if len(sizes) == 1:
            assert gate.wait(20)
        yield from generate(lm, prompts, cfg, eos_id, decode)

    return run, gate, sizes


def test_dynamic_batching_batches_waiting_requests(engine):
    generate, gate, sizes = gated()
    cases = [("first", RED, 6), ("what colour?", BLUE, 5), ("a text-only question that is longer", None, 9),
             ("describe", RED, 12)]
    with client(engine, generate, max_batch=8) as c, ThreadPoolExecutor(4) as pool:
        worker = c.app.state.worker

        def post(q, im, n):
            return c.post(URL, json={"messages": image_message(q, im), "max_tokens": n})

        futures = [pool.submit(post, *cases[0])]
        wait_for(lambda: sizes == [1])
        futures += [pool.submit(post, *case) for case in cases[1:]]
        wait_for(lambda: worker.pending == 3)
        gate.set()
        results = [f.result(timeout=60) for f in futures]
        stats = c.get("/health").json()["stats"]
    assert sizes == [1, 3] and stats["batch_sizes"] == {"1": 1, "3": 1}
    for (q, im, n), r in zip(cases, results):
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= n
        assert r.json()["choices"][0]["message"]["content"] == engine_answer(engine, [Turn(q, [im] if im else [])], n)


def test_per_request_stop_and_max_tokens_inside_a_batch(engine):
    generate, gate, sizes = gated(scripted_generate(engine.tokenizer, "hello STOP world"))
    with client(engine, generate) as c, ThreadPoolExecutor(3) as pool:
        first = pool.submit(c.post, URL, json={"messages": image_message("first")})
        wait_for(lambda: sizes == [1])
        a = pool.submit(c.post, URL, json={"messages": image_message("a"), "stop": ["STOP"]})
        b = pool.submit(c.post, URL, json={"messages": image_message("b"), "stop": "xyz", "max_tokens": 8})
        wait_for(lambda: c.app.state.worker.pending == 2)
        gate.set()
        ra, rb = a.result(timeout=30).json(), b.result(timeout=30).json()
        assert first.result(timeout=30).json()["choices"][0]["message"]["content"] == "hello STOP world"
    assert sizes == [1, 2]
    assert ra["choices"][0]["message"]["content"] == "hello" and ra["choices"][0]["finish_reason"] == "stop"
    assert rb["choices"][0]["message"]["content"] == "hello ST" and rb["choices"][0]["finish_reason"] == "length"


def test_queue_full_gives_429(engine):
    generate, gate, sizes = gated(scripted_generate(engine.tokenizer, "ok"))
    with client(engine, generate, max_batch=1, queue_size=2) as c, ThreadPoolExecutor(3) as pool:

        def post():
            return c.post(URL, json={"messages": image_message("q")})

        futures = [pool.submit(post)]
        wait_for(lambda: sizes == [1])
        futures += [pool.submit(post), pool.submit(post)]
        wait_for(lambda: c.app.state.worker.pending == 2)
        r = post()
        gate.set()
        assert all(f.result(timeout=30).status_code == 200 for f in futures)
    assert_error(r, 429, "queue_full")
    assert r.headers["retry-after"] == "1"


def test_timeout_gives_504(engine):
    slow = scripted_generate(engine.tokenizer, "x" * 100, delay_s=0.05)
    with client(engine, slow, timeout_s=0.4) as c:
        t0 = time.monotonic()
        r = c.post(URL, json={"messages": image_message("q")})
        s = c.post(URL, json={"messages": image_message("q"), "stream": True})
        wait_for(lambda: c.app.state.worker.stats.timed_out == 2)
    assert time.monotonic() - t0 < 4
    assert assert_error(r, 504, "timeout")["type"] == "timeout_error"
    events = sse_events(s.text)
    assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"


def test_body_too_large_gives_413(engine):
    with client(engine, max_body_bytes=2000) as c:
        r = c.post(URL, json={"messages": image_message("x" * 3000)})
        ok = c.post(URL, json={"messages": image_message("small"), "max_tokens": 2})
    assert_error(r, 413, "body_too_large")
    assert ok.status_code == 200


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width × height`` pixels but carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (9_000, 9_000)])
def test_decompression_bomb_gives_400(engine, width, height):
    with client(engine) as c:
        r = c.post(URL, json={"messages": image_message("q", url=data_url(png_header_only(width, height)))})
    assert_error(r, 400, "image_too_large", "messages.0.content.0.image_url.url")


def test_image_pixel_limit_and_bad_images(engine):
    noisy = png(Image.effect_noise((50, 50), 64).convert("RGB"))
    truncated = noisy[:len(noisy) // 2]
    cases = [(data_url(png(RED)), "image_too_large"), (data_url(b"definitely not an image"), "invalid_image"),
             (data_url(truncated), "invalid_image"), ("data:image/png;base64,@@@@", "invalid_image"),
             ("data:text/plain;base64,aGVsbG8=", "invalid_image_url"),
             ("https://example.com/a.png", "unsupported_image_url"),
             ("/etc/hostname", "image_path_not_allowed")]
    with client(engine, limits=Limits(max_image_pixels=10_000)) as c:
        for url, code in cases:
            assert_error(c.post(URL, json={"messages": image_message("q", url=url)}), 400, code)


def test_prompt_token_limits(engine):
    with client(engine, limits=Limits(max_prompt_tokens=30)) as c:
        err = assert_error(c.post(URL, json={"messages": image_message("x" * 40)}), 400, "context_length_exceeded")
        assert "30" in err["message"]
    long = scripted_generate(engine.tokenizer, "y" * 400)
    with client(engine, long) as c:  # the model's own context (256 positions)
        assert_error(c.post(URL, json={"messages": image_message("x" * 300)}), 400, "context_length_exceeded")
        r = c.post(URL, json={"messages": image_message("q"), "max_tokens": 100_000}).json()
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 256  # max_tokens clamped to the room


def test_schema_errors_are_400(engine):
    img = {"type": "image_url", "image_url": {"url": data_url(png(RED))}}
    bad = [({"messages": image_message("q"), "n": 2}, "n"),
           ({"messages": []}, "messages"),
           ({}, "messages"),
           ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
           ({"messages": image_message("q"), "temperature": 5}, "temperature"),
           ({"messages": image_message("q"), "max_tokens": 0}, "max_tokens"),
           ({"messages": image_message("q"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
           ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}, "messages.0"),
           ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
           ({"messages": [{"role": "user", "content": [img, img]}]}, "messages.0.content"),
           ({"messages": [{"role": "assistant", "content": [img]}]}, "messages.0.content.0"),
           ({"messages": [{"role": "user", "content": "look: <ImageHere>"}]}, "messages.0.content"),
           ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, None)]
    with client(engine) as c:
        for body, param in bad:
            assert_error(c.post(URL, json=body), 400, param=param)
        err = assert_error(c.post(URL, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
        assert err["code"] == "invalid_json"
        assert_error(c.post(URL, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
        assert_error(c.get(URL), 405, "method_not_allowed")
        assert_error(c.get("/v1/nothing"), 404, "not_found")


def test_api_key(engine, monkeypatch):
    with client(engine, api_key="sekret") as c:
        assert c.get("/health").status_code == 200 and c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_error(c.post(URL, json={"messages": image_message("q")}), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(c.post(URL, json={"messages": image_message("q")}, headers=wrong), 401, "invalid_api_key")
        assert_error(c.get("/openapi.json"), 401)
        good = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        r = c.post(URL, json={"messages": image_message("q"), "max_tokens": 2}, headers=good)
        assert r.status_code == 200


def test_image_dir(engine, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    RED.save(root / "red.png")
    BLUE.save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with client(engine, limits=Limits(image_dir=root)) as c:
        def ask(url):
            return c.post(URL, json={"messages": image_message("q", url=url), "max_tokens": 2})

        assert ask("red.png").status_code == 200
        assert ask((root / "red.png").as_uri()).status_code == 200
        assert ask(str(root / "red.png")).status_code == 200
        for url in ("../outside.png", str(tmp_path / "outside.png"), (tmp_path / "outside.png").as_uri(), "link.png",
                    "file://otherhost/red.png"):
            assert_error(ask(url), 400, "image_path_not_allowed")
        assert_error(ask("missing.png"), 400, "image_not_found")


def test_cli_parser_and_settings(engine, monkeypatch, tmp_path):
    import argparse

    from tinygptv.serve.cli import add_serve_parser, build_app, cmd_serve, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "tiny", "--max-batch", "3", "--queue-size", "5", "--timeout", "7",
                              "--image-dir", str(tmp_path), "--max-body-mb", "0.5", "--max-prompt-tokens", "99"])
    assert args.func is cmd_serve and args.host == "127.0.0.1" and args.port == 8000
    monkeypatch.setenv("TINYGPTV_API_KEY", "from-env")
    s = settings_from_args(args, "tiny")
    assert (s.max_batch, s.queue_size, s.timeout_s, s.api_key, s.max_body_bytes) == (3, 5, 7.0, "from-env", 2**19)
    assert s.limits.image_dir == tmp_path and s.limits.max_prompt_tokens == 99
    args.api_key = "flag"
    assert settings_from_args(args, "tiny").api_key == "flag"
    with pytest.raises(ValueError):
        settings_from_args(parser.parse_args(["serve", "--max-batch", "0"]), "x")
    app = build_app(args)
    with TestClient(app) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer flag"}).json()["data"][0]["id"] == "tiny"


def wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_worker_waits_for_returning_clients_but_not_for_a_lone_one(engine):
    from tinygptv.serve.worker import BatchWorker, Done, Job

    generate, gate, sizes = gated(scripted_generate(engine.tokenizer, "ok"))
    worker = BatchWorker(engine, max_batch=4, batch_wait_s=1.0, generate=generate)
    done: list[float] = []

    def job(question: str) -> Job:
        request = engine.chat_request(question)
        def sink(event) -> None:
            if isinstance(event, Done):
                done.append(time.monotonic())

        return Job(request, GenerationConfig(max_new_tokens=4), engine.prompt_embeddings(request)[0].shape[0], sink, 30)

    worker.start()
    try:
        worker.submit(job("x"))  # held by the gate while a, b, c arrive: 4 jobs in the system
        wait_for(lambda: sizes == [1])
        for q in ("a", "b", "c"):
            worker.submit(job(q))
        t0 = time.monotonic()
        gate.set()
        time.sleep(0.3)
        worker.submit(job("d"))  # x's client coming back: a, b, c waited for it
        wait_for(lambda: len(done) == 5)
        assert sizes == [1, 4] and 0.3 <= done[-1] - t0 < 0.9
    finally:
        worker.stop()
    worker = BatchWorker(engine, max_batch=4, batch_wait_s=1.0, generate=generate)
    worker.start()
    try:
        for q in "efgh":  # one client alone, request after request: never waits
            t0 = time.monotonic()
            worker.submit(job(q))
            wait_for(lambda t0=t0: done[-1] > t0)
            assert done[-1] - t0 < 0.5
        assert sizes == [1, 4, 1, 1, 1, 1]
    finally:
        worker.stop()
