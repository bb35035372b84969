import json
import logging
import subprocess
import sys

import pytest
from PIL import Image

from tinygptv.cli import main
from tinygptv.infer.chat import Conversation, Turn
from tinygptv.infer.engine import Engine
from tinygptv.infer.generate import GenerationConfig
from tinygptv.infer.grounding import draw_boxes, parse_boxes, strip_grounding


def test_parse_boxes_pixels_and_phrases():
    text = "<p>red ball</p> {<10><20><30><40>}<delim>{<50><50><100><100>} and <p>cat</p> {<0><0><1><1>}"
    boxes = parse_boxes(text, 200, 100)
    assert [(b.x1, b.y1, b.x2, b.y2) for b in boxes] == [(20, 20, 60, 40), (100, 50, 200, 100), (0, 0, 2, 1)]
    assert [b.label for b in boxes] == ["red ball", "red ball", "cat"]
    assert boxes[0].grid == (10, 20, 30, 40)
    assert parse_boxes("{<1><2><3><4>}", 100, 100)[0].label is None
    assert strip_grounding(text) == "red ball, and cat"


@pytest.mark.parametrize("bad", ["{<10><20><30>}", "{<10><20><300><40>}", "{<50><20><10><40>}", "{<a><b><c><d>}",
                                 "<10><20><30><40>", "{<10><20><30><40>", "", "{<-1><0><5><5>}"])
def test_malformed_boxes_give_nothing(bad):
    assert parse_boxes(bad, 100, 100) == []


def test_draw_boxes():
    img = Image.new("RGB", (100, 100), "white")
    out = draw_boxes(img, parse_boxes("{<10><10><50><50>}", 100, 100))
    assert out.getpixel((10, 30)) != (255, 255, 255) and img.getpixel((10, 30)) == (255, 255, 255)


def test_conversation_layout(tiny_model, red_image):
    conv = Conversation(Engine(tiny_model))
    conv.turns = [Turn("q1", [red_image], "a1"), Turn("q2", [], "a2"), Turn("q3")]
    ex = conv.request(conv.turns).prompt
    assert ex.condition == "[INST] <Img><ImageHere></Img> q1  [/INST]"
    assert ex.targets == [("a1###", False), ("[INST] q2 [/INST]", False), ("a2###", False), ("[INST] q3 [/INST]", False)]
    assert ex.bos_before == (1, 3)


def test_conversation_truncates_oldest_turns(tiny_model, red_image, caplog):
    conv = Conversation(Engine(tiny_model))
    conv.add_image(red_image)
    cfg = GenerationConfig(max_new_tokens=4)
    long_q = "tell me more about it " * 3
    with caplog.at_level(logging.WARNING):
        for _ in range(8):  # ~80 tokens per turn: the 256-position tiny model overflows after 3 turns
            "".join(conv.ask(long_q, cfg))
    assert conv.dropped > 0 and "dropped the oldest turn" in caplog.text
    assert conv.turns[0].images  # the image moved forward with the kept turns
    with pytest.raises(ValueError, match="tokens"):
        "".join(conv.ask("x" * 400, cfg))
    assert conv.turns[-1].question != "x" * 400


def test_cli_ask_json(capsys, tmp_path):
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "4", "--json", "--quantize", "int8",
                 "--draw", str(tmp_path / "b.png"), "what is it?"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) >= {"answer", "boxes", "timings", "finish_reason", "completion_tokens"}
    assert out["completion_tokens"] <= 4
    # the random model's 4 tokens hold no box: nothing is drawn, and the user is told so
    assert not out["boxes"] and not (tmp_path / "b.png").exists()
    assert "nothing drawn" in captured.err


def test_cli_ask_fast_decode(capsys):
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "4", "--json", "--fast-decode", "what is it?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and out["completion_tokens"] <= 4


def test_cli_ask_bad_image(capsys):
    assert main(["ask", "--model", "tiny", "--image", "does-not-exist.png", "q"]) == 2
    assert "image not found" in capsys.readouterr().err


def test_cli_chat_scripted_session(tmp_path):
    img = tmp_path / "x.png"
    Image.new("RGB", (20, 20), "red").save(img)
    script = f"hello\n/image {img}\nwhat colour?\n/image missing.png\n/reset\nbye\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "tinygptv", "chat", "--model", "tiny", "--max-new-tokens", "3"],
                          input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(image attached:" in proc.stdout and "image not found" in proc.stdout
    assert "(conversation cleared)" in proc.stdout
    assert proc.stdout.count(">>>") == 7  # one prompt per input line
