import pytest
import torch

from tinygptv.infer import engine as engine_mod
from tinygptv.infer.engine import Engine, Request, cut_at_stop, safe_prefix_len
from tinygptv.infer.generate import GenerationConfig, StepEvent


@pytest.fixture
def engine(tiny_model):
    return Engine(tiny_model)


def test_batched_equals_single(engine, red_image, blue_image):
    reqs = [engine.chat_request("what colour is it?", [red_image]),
            engine.chat_request("hi", [blue_image]),
            Request("a text-only prompt that is quite a bit longer than the others", []),
            Request("<ImageHere> and <ImageHere>", [red_image, blue_image])]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = engine.generate(reqs, cfg)
    for req, res in zip(reqs, batched):
        alone = engine.generate([req], cfg)[0]
        assert alone.token_ids == res.token_ids
        assert alone.text == res.text


def test_streamed_equals_generated(engine, red_image):
    req = engine.chat_request("describe", [red_image])
    cfg = GenerationConfig(max_new_tokens=12)
    assert "".join(engine.stream(req, cfg)) == engine.generate([req], cfg)[0].text


def test_image_cache_skips_vision(engine, red_image, monkeypatch):
    calls = []
    original = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda px: calls.append(px.shape[0]) or original(px))
    a = engine.generate([engine.chat_request("q1", [red_image])], GenerationConfig(max_new_tokens=3))
    b = engine.generate([engine.chat_request("q1", [red_image.copy()])], GenerationConfig(max_new_tokens=3))
    assert calls == [1] and engine.cache.hits == 1
    assert a[0].token_ids == b[0].token_ids


def test_sampling_seed_and_degenerate_cases(engine, red_image):
    req = [engine.chat_request("q", [red_image])]
    greedy = engine.generate(req, GenerationConfig(max_new_tokens=6))[0].token_ids
    s1 = engine.generate(req, GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3))[0].token_ids
    s2 = engine.generate(req, GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3))[0].token_ids
    assert s1 == s2
    assert engine.generate(req, GenerationConfig(max_new_tokens=6, temperature=0.7, top_k=1, seed=1))[0].token_ids == greedy
    assert engine.generate(req, GenerationConfig(max_new_tokens=6, temperature=0.7, top_p=1e-6, seed=1))[0].token_ids == greedy


def test_beam_search_scores_at_least_greedy(engine, red_image):
    req = engine.chat_request("q", [red_image])
    emb = engine.prompt_embeddings(req)

    cfg = GenerationConfig(max_new_tokens=4, length_penalty=0.0)
    greedy = engine.generate([req], cfg)[0].token_ids
    beam = engine.generate([req], GenerationConfig(max_new_tokens=4, num_beams=4, length_penalty=0.0))[0].token_ids

    def score(ids):
        embeds, mask = emb
        seq = torch.cat([embeds, engine.model.lm.embed_tokens(torch.tensor(ids))])[None]
        with torch.no_grad():
            lp = torch.log_softmax(engine.model.lm(inputs_embeds=seq), -1)[0]
        n = embeds.shape[0]
        return sum(float(lp[n - 1 + i, t]) for i, t in enumerate(ids))

    assert len(beam) == len(greedy) == 4  # no EOS/stop within 4 tokens for this seed
    assert score(beam) >= score(greedy) - 1e-4


def test_stop_strings_never_leak(engine, monkeypatch):
    tok = engine.tokenizer
    script = tok.encode("  ans#wer ##x###tail")  # leading spaces: stripped, never repeated

    def fake_generate(lm, prompts, cfg, eos_id, decode, **kwargs):
        out = []
        for i, t in enumerate(script):
            out.append(t)
            stopped = any(s in decode(out) for s in cfg.stop)
            yield StepEvent(0, t, stopped, "stop" if stopped else None)
            if stopped:
                return

    monkeypatch.setattr(engine_mod, "generate_tokens", fake_generate)
    chunks = list(engine.stream(Request("p", []), GenerationConfig(max_new_tokens=50)))
    assert "".join(chunks) == "ans#wer ##x"
    assert all("###" not in c for c in chunks)
    assert engine.generate([Request("p", [])])[0].text == "ans#wer ##x"


def test_stop_helpers():
    assert cut_at_stop("abc###def", ("###",)) == ("abc", True)
    assert cut_at_stop("abc", ("###",)) == ("abc", False)
    assert safe_prefix_len("abc##", ("###",)) == 3
    assert safe_prefix_len("abc#x", ("###",)) == 5
    assert safe_prefix_len("ab\ufffd", ()) == 2


def test_bad_settings():
    with pytest.raises(ValueError):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=0)


def test_prefix_cache_reuses_prompt_keys_values(tiny_model, red_image, blue_image):
    cached, plain = Engine(tiny_model), Engine(tiny_model, prefix_cache_mb=0)
    cfg = GenerationConfig(max_new_tokens=6)
    q = tiny_model.cfg.qformer.num_queries
    first = cached.chat_request("what colour is the square?", [red_image])
    second = cached.chat_request("and what shape is it?", [red_image])
    for req in (first, second):
        assert cached.generate([req], cfg)[0].token_ids == plain.generate([req], cfg)[0].token_ids
    reused = cached.prefixes.reused_tokens
    assert cached.prefixes.hits == 1 and reused >= q  # everything up to and including the image tokens
    other = cached.chat_request("what colour is the square?", [blue_image])  # another image: only the text before it
    assert cached.generate([other], cfg)[0].token_ids == plain.generate([other], cfg)[0].token_ids
    assert cached.prefixes.reused_tokens - reused <= reused - q
    # streaming and beam search share the cache and agree with the uncached engine
    assert "".join(cached.stream(second, cfg)) == plain.generate([second], cfg)[0].text
    beams = GenerationConfig(max_new_tokens=4, num_beams=3)
    assert cached.generate([second], beams)[0].token_ids == plain.generate([second], beams)[0].token_ids


def test_prefix_cache_bounds(tiny_model, red_image):
    from tinygptv.infer.generate import PrefixCache

    engine = Engine(tiny_model)
    engine.prefixes = PrefixCache(max_entries=2)
    for i in range(4):
        engine.generate([engine.chat_request(f"question {i}", [red_image])], GenerationConfig(max_new_tokens=2))
    assert len(engine.prefixes.entries) == 2
    engine.prefixes = PrefixCache(max_bytes=1)  # nothing fits: never stored, still correct
    a = engine.generate([engine.chat_request("q", [red_image])], GenerationConfig(max_new_tokens=3))
    assert not engine.prefixes.entries
    assert a[0].token_ids == Engine(tiny_model, prefix_cache_mb=0).generate(
        [engine.chat_request("q", [red_image])], GenerationConfig(max_new_tokens=3))[0].token_ids


def test_prefix_cache_keeps_one_entry_per_conversation(tiny_model, red_image):
    engine = Engine(tiny_model)
    req = engine.chat_request("same question", [red_image])
    for _ in range(3):
        engine.generate([req], GenerationConfig(max_new_tokens=2))
    assert len(engine.prefixes.entries) == 1  # a repeated (or extended) prompt replaces the entry it covers
    engine.generate([engine.chat_request("another question", [red_image])], GenerationConfig(max_new_tokens=2))
    assert len(engine.prefixes.entries) == 2


def test_prefix_entry_is_stored_when_the_request_ends(tiny_model, red_image):
    """The prompt's keys/values are remembered when the request ends (copied layer by layer while the request's
    cache is dropped), also when a stream is abandoned early; a follow-up reuses them exactly."""
    from tinygptv.infer.generate import generate_tokens

    engine, plain = Engine(tiny_model), Engine(tiny_model, prefix_cache_mb=0)
    first = engine.chat_request("what colour is the square?", [red_image])
    prompt = engine.prompt_embeddings(first)
    events = generate_tokens(tiny_model.lm, [prompt], GenerationConfig(max_new_tokens=8), -1, pad_id=0,
                             prefix_cache=engine.prefixes)
    next(events)
    assert not engine.prefixes.entries  # still decoding: nothing stored yet
    events.close()  # the client went away
    assert len(engine.prefixes.entries) == 1
    (emb, _, ks, _), = engine.prefixes.entries.values()
    assert ks[0].shape[2] == prompt[0].shape[0] == emb.shape[0]
    follow = engine.chat_request("and what shape is it?", [red_image])
    cfg = GenerationConfig(max_new_tokens=6)
    assert engine.generate([follow], cfg)[0].token_ids == plain.generate([follow], cfg)[0].token_ids
    assert engine.prefixes.hits == 1


def test_prefix_store_consume_drops_the_request_cache(tiny_model):
    from tinygptv.infer.generate import PrefixCache
    from tinygptv.model.phi import KVCache

    cfg = tiny_model.cfg.lm
    cache = KVCache(1, 12, cfg, torch.float32, "cpu")
    for i in range(cfg.layers):
        cache.k[i].normal_()
        cache.v[i].normal_()
    expected = [k[:, :, :10].clone() for k in cache.k]
    prefixes = PrefixCache(min_tokens=1)
    prefixes.store(torch.randn(10, cfg.hidden), torch.ones(10, dtype=torch.long), cache, consume=True)
    assert all(k is None for k in cache.k + cache.v)
    (_, _, ks, _), = prefixes.entries.values()
    assert all(torch.equal(a, b) for a, b in zip(ks, expected))


def test_fast_decode_engine(tiny_model, red_image, blue_image):
    """Batched/single and streamed/generated stay identical with fast decoding (its closeness to the default
    engine's logits: tests/test_model.py::test_fused_decode_cache_matches_full_forward)."""
    fast = Engine(tiny_model, fast_decode=True)
    cfg = GenerationConfig(max_new_tokens=6)
    reqs = [fast.chat_request("colour?", [red_image]), fast.chat_request("what is this shape?", [blue_image])]
    batched = [r.token_ids for r in fast.generate(reqs, cfg)]
    assert batched == [fast.generate([r], cfg)[0].token_ids for r in reqs]
    assert "".join(fast.stream(reqs[0], cfg)) == fast.generate([reqs[0]], cfg)[0].text
    beams = fast.generate([reqs[1]], GenerationConfig(max_new_tokens=4, num_beams=2))[0]  # reorders a bf16 cache
    assert len(beams.token_ids) <= 4 and isinstance(beams.text, str)
