"""Golden tests of the sequence layout and label masking (reference §1.7, §5.6).

The byte-level tokenizer maps every ASCII character c to id ord(c)+1 (id 0 = <|endoftext|>), so every
expected id below can be checked by hand.
"""

import pytest
import torch

from tinygptv.model.sequence import (IGNORE_INDEX, Example, build_batch, causal_lm_loss, multi_turn, single_turn,
                                     token_logprobs)
from tinygptv.templates import get_template
from tinygptv.tokenizer import Tokenizer

TOK = Tokenizer.byte_level(eos_id=0)
C = 8


def ids(s):
    return [ord(c) + 1 for c in s]


@pytest.fixture
def embed():
    torch.manual_seed(0)
    return torch.nn.Embedding(300, C)


def img(n=1, q=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, q, C, generator=g)


def run(examples, images, embed, **kw):
    return build_batch(examples, images, TOK, embed, pad_token_id=0, bos_token_id=0, **kw)


def test_single_turn_with_image(embed):
    image = img()
    b = run([single_turn("ab<ImageHere>c", "xy", "#")], [image], embed)
    # [BOS] a b [4 image] c x y #
    assert b.inputs_embeds.shape == (1, 11, C)
    assert b.attention_mask.tolist() == [[1] * 11]
    assert b.labels[0].tolist() == [IGNORE_INDEX] * 8 + ids("xy#")
    torch.testing.assert_close(b.inputs_embeds[0, 0], embed.weight[0])
    torch.testing.assert_close(b.inputs_embeds[0, 1:3], embed.weight[ids("ab")])
    torch.testing.assert_close(b.inputs_embeds[0, 3:7], image[0])
    torch.testing.assert_close(b.inputs_embeds[0, 7:11], embed.weight[ids("cxy#")])


def test_batch_padding_layout(embed):
    """Per sample: [BOS][cond real][target | target pad][cond pad]; pads use the pad-id embedding, mask 0."""
    b = run([single_turn("<ImageHere>long prompt", "a", "\n"), single_turn("<ImageHere>", "answer", "\n")],
            [img(), img(seed=2)], embed)
    c0, c1 = 4 + len("long prompt"), 4
    t0, t1 = 2, 7
    L = 1 + max(c0, c1) + max(t0, t1)
    assert b.inputs_embeds.shape[1] == L
    assert b.attention_mask[0].tolist() == [1] * (1 + c0 + t0) + [0] * (L - 1 - c0 - t0)
    assert b.attention_mask[1].tolist() == [1] * (1 + c1 + t1) + [0] * (L - 1 - c1 - t1)
    assert b.labels[1].tolist() == [IGNORE_INDEX] * 5 + ids("answer\n") + [IGNORE_INDEX] * (L - 12)
    torch.testing.assert_close(b.inputs_embeds[1, 12:], embed.weight[0].expand(L - 12, C))


def test_stage12_condition_is_image_only(embed):
    image = img()
    b = run([Example(None, [("a cat\n", True)])], [image], embed)
    torch.testing.assert_close(b.inputs_embeds[0, 1:5], image[0])
    assert b.labels[0].tolist() == [IGNORE_INDEX] * 5 + ids("a cat\n")


def test_text_only(embed):
    b = run([single_turn("hi", "ok", "###")], [None], embed)
    assert b.labels[0].tolist() == [IGNORE_INDEX] * 3 + ids("ok###")
    torch.testing.assert_close(b.inputs_embeds[0, 1:3], embed.weight[ids("hi")])


def test_multi_turn_layout(embed):
    tpl = get_template("stage4")
    ex = multi_turn(tpl, ["<Img><ImageHere></Img> q1 ", "q2 "], ["a1", "a2"])
    assert ex.condition == "[INST] <Img><ImageHere></Img> q1  [/INST]"
    b = run([ex], [img()], embed)
    cond = 1 + len("[INST] <Img>") + 4 + len("</Img> q1  [/INST]")
    regress = ids("a1###") + [0] + ids("[INST] q2  [/INST]") + ids("a2###")
    assert b.labels.shape[1] == cond + len(regress)
    bos_at = cond + 5
    assert b.attention_mask[0, bos_at] == 0 and b.attention_mask[0].sum() == b.labels.shape[1] - 1
    sup = [t if i < 5 or i >= len(regress) - 5 else IGNORE_INDEX for i, t in enumerate(regress)]
    assert b.labels[0, cond:].tolist() == sup
    assert TOK.decode([t for t in b.labels[0].tolist() if t != IGNORE_INDEX]) == "a1###a2###"


def test_truncation_cuts_target(embed):
    b = run([single_turn("p", "abcdef", "###")], [None], embed, max_txt_len=4)
    assert b.labels[0].tolist() == [IGNORE_INDEX] * 2 + ids("abcd")


def test_no_bos(embed):
    b = run([single_turn("p", "a", "")], [None], embed, add_bos=False)
    torch.testing.assert_close(b.inputs_embeds[0, 0], embed.weight[ids("p")[0]])


def test_placeholder_count_mismatch_raises(embed):
    with pytest.raises(ValueError, match="1 <ImageHere> placeholder"):
        run([single_turn("<ImageHere>", "a", "")], [img(n=2)], embed)
    with pytest.raises(ValueError, match="0 <ImageHere> placeholder"):
        run([single_turn("no image here", "a", "")], [img()], embed)


def test_two_images_in_one_prompt(embed):
    images = img(n=2)
    b = run([single_turn("<ImageHere>and<ImageHere>", "y", "")], [images], embed)
    torch.testing.assert_close(b.inputs_embeds[0, 1:5], images[0])
    torch.testing.assert_close(b.inputs_embeds[0, 8:12], images[1])


def test_loss_is_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    loss = causal_lm_loss(logits, labels)
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(5)
             if labels[b, t] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    lp = token_logprobs(logits, labels)
    torch.testing.assert_close(lp[0], -(terms[0] + terms[1]))
