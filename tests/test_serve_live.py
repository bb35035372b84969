"""A live server (uvicorn on 127.0.0.1, free port): the official ``openai`` client, client disconnects, and the
web page driven by headless Chromium over the DevTools protocol."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra (fastapi, uvicorn)")

import tinygptv
from tinygptv.infer.engine import Engine
from tinygptv.infer.generate import GenerationConfig
from tinygptv.serve.app import ServeSettings, create_app
from tinygptv.serve.testing import ServerThread, scripted_generate

CHROMIUM = Path("/usr/bin/chromium")
KEY = "live-test-key"


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(tinygptv.load("tiny", seed=1))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_client_stream_and_non_stream(engine):
    openai = pytest.importorskip("openai", reason="needs the openai client package")
    image = Image.new("RGB", (48, 32), (30, 160, 40))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "what colour is it?"}]}]
    expected = engine.generate([engine.chat_request("what colour is it?", [image])],
                               GenerationConfig(max_new_tokens=12))[0].text
    with ServerThread(create_app(engine, ServeSettings(model_id="tiny", api_key=KEY))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=messages, n=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    choice = resp.choices[0]
    assert choice.message.content == expected and choice.finish_reason in ("stop", "length")
    assert choice.message.model_extra["grounding"] == []
    assert resp.usage.completion_tokens <= 12 and resp.usage.total_tokens > resp.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens


def test_client_disconnect_cancels_generation(engine):
    httpx = pytest.importorskip("httpx")
    steps: list[int] = []
    slow = scripted_generate(engine.tokenizer, "z" * 200, delay_s=0.02, on_step=steps.append)
    app = create_app(engine, ServeSettings(model_id="tiny"), slow)
    body = {"messages": [{"role": "user", "content": "go"}], "stream": True}
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as resp:
            got = []
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    got.append(line)
                if len(got) == 3:
                    break
            assert '"content": "z' in got[-1]
        worker = app.state.worker
        end = time.monotonic() + 10
        while worker.stats.cancelled == 0 and time.monotonic() < end:
            time.sleep(0.02)
        seen = len(steps)
        time.sleep(0.3)
        assert worker.stats.cancelled == 1 and worker.stats.completed == 0
        assert len(steps) == seen < 150  # the batch stopped generating once its only row was cancelled


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.ws = None
        self.next_id = 0

    def __enter__(self) -> DevTools:
        from websockets.sync.client import connect

        self.ws = connect(self.ws_url, max_size=None, open_timeout=20).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ws.__exit__(*exc)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")


def launch_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium with a DevTools port; return the process and the page's websocket URL."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             "--window-size=1200,820", "about:blank"]
    proc = subprocess.Popen([str(CHROMIUM), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    port = None
    while port is None and time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        port = m.group(1) if m else None
    if port is None:
        proc.kill()
        raise RuntimeError("chromium did not start its DevTools server")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        pages = [t for t in json.load(resp) if t["type"] == "page"]
    return proc, pages[0]["webSocketDebuggerUrl"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_web_page_in_headless_chromium(engine, tmp_path):
    pytest.importorskip("websockets", reason="needs the websockets package to speak the DevTools protocol")
    answer = "<p>red square</p> {<25><20><75><80>}"
    app = create_app(engine, ServeSettings(model_id="tiny"), scripted_generate(engine.tokenizer, answer, delay_s=0.01))
    image_path = tmp_path / "square.png"
    image = Image.new("RGB", (240, 160), (235, 235, 235))
    image.paste((200, 30, 30), (60, 32, 180, 128))
    image.save(image_path)
    with ServerThread(app) as server:
        proc, ws_url = launch_chromium(tmp_path / "profile")
        try:
            with DevTools(ws_url) as page:
                page.call("Page.enable")
                page.call("Page.navigate", url=server.url + "/")
                page.wait("document.readyState === 'complete' && $('status').textContent.includes('tiny')")
                root = page.call("DOM.getDocument")["root"]["nodeId"]
                node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
                page.call("DOM.setFileInputFiles", files=[str(image_path)], nodeId=node)
                page.wait("document.getElementById('canvas').style.display === 'block'")
                page.eval("document.querySelector('.tag:nth-child(4)').click()")  # [grounding]
                assert page.eval("document.getElementById('q').value") == "[grounding] "
                page.eval("$('q').value += 'the red square'; $('send').click()")
                page.wait("document.querySelector('.msg.assistant')?.dataset.done")
                text = page.eval("document.querySelector('.msg.assistant').textContent")
                chunks = int(page.eval("document.querySelector('.msg.assistant').dataset.chunks"))
                boxes = json.loads(page.eval("document.getElementById('canvas').dataset.boxes"))
                errors = page.eval("document.querySelectorAll('.msg.error').length")
                pixel = page.eval("(() => { const b = JSON.parse(canvas.dataset.boxes)[0];"
                                  " const x = Math.round(b.x + b.w / 2), y = Math.round(b.y + b.h);"
                                  " return Array.from(ctx.getImageData(x, y, 1, 1).data); })()")
                shot = page.call("Page.captureScreenshot", format="png")["data"]
                scale = page.eval("canvas.width") / image.width
        finally:
            proc.kill()
            proc.wait(10)
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    assert errors == 0 and text == answer and chunks > 3
    assert len(boxes) == 1 and boxes[0]["label"] == "red square"
    expected = [60, 32, 120, 96]  # 25–75 % of 240 px, 20–80 % of 160 px, times the canvas scale
    assert [round(boxes[0][k], 1) for k in ("x", "y", "w", "h")] == [round(v * scale, 1) for v in expected]
    assert pixel[:3] == [230, 25, 75]  # the first box colour, drawn on the canvas
    assert Image.open(tmp_path / "page.png").size[0] > 0
