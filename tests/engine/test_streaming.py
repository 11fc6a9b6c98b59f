"""The engine as a server drives it: per-step deltas, the thread-safe inbox, n > 1, penalties, min_tokens,
processed logprobs, arrival times; and the text layer above it (TextStream: multi-byte characters, stop
strings split over tokens, cut token counts)."""

import threading
import time

import pytest
import torch
from tests.conftest import make_model
from tests.engine.helpers import oracle_drafts

from mimo.data import Tokenizer
from mimo.data.detok import TextStream
from mimo.engine import LLM, SamplingParams
from mimo.engine.sampler import probs_from_logits
from mimo.model import generate


@pytest.fixture(scope="module")
def model():
    return make_model()


def _engine(model, **kw):
    base = dict(max_model_len=128, max_num_seqs=8, block_size=4, max_num_batched_tokens=16)
    return LLM(model, **{**base, **kw})


def _drive(llm):
    toks, last = {}, {}
    while llm.has_unfinished_requests():
        for d in llm.step():
            toks.setdefault((d.request_id, d.index), []).extend(d.new_token_ids)
            assert d.num_output_tokens == len(toks[d.request_id, d.index])
            last[d.request_id, d.index] = d
    return toks, last


def test_deltas_carry_only_new_tokens_and_concatenate_to_the_reference(model):
    llm = _engine(model, num_speculative_tokens=2)
    prompts = [[5, 6, 7], list(range(1, 30))]
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0))
    seen_multi, times = False, []
    toks = {}
    while llm.has_unfinished_requests():
        for d in llm.step():
            assert d.new_token_ids, "without aborts a delta is only sent for progress"
            seen_multi |= len(d.new_token_ids) > 1 or d.finished
            toks.setdefault(d.request_id, []).extend(d.new_token_ids)
            times.append(d.time)
    assert times == sorted(times)
    for i, p in enumerate(prompts):
        assert toks[str(i)] == generate(model, p, 20)


def test_abort_from_another_thread_is_applied_between_steps(model):
    llm = _engine(model, num_speculative_tokens=3)
    for i in range(6):
        llm.add_request(str(i), [1 + i, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    stop = threading.Event()

    def aborter():
        for i in range(6):
            time.sleep(0.002)
            llm.abort(str(i))
        stop.set()

    t = threading.Thread(target=aborter)
    t.start()
    ended = {}
    while llm.has_unfinished_requests() or not stop.is_set():
        for d in llm.step():
            if d.finished:
                ended[d.request_id] = d.finish_reason
    t.join()
    assert ended == {str(i): "abort" for i in range(6)}, "every aborted request gets one final delta"
    u = llm.block_manager.usage()
    assert u.full_used == 0 and u.sliding_used == 0
    assert llm.stats()["running"] == 0 and llm.stats()["waiting"] == 0
    assert llm.abort("0") is False


def test_n_samples_equal_separately_seeded_requests(model):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3)
    llm = _engine(model)
    llm.add_request("g", [3, 4, 5], sp)
    group, _ = _drive(llm)
    assert sorted(group) == [("g", 0), ("g", 1), ("g", 2)]
    for i in range(3):
        alone = _engine(model).generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i))
        assert group["g", i] == alone[0].token_ids
    assert len({tuple(v) for v in group.values()}) > 1


def test_duplicate_request_id_is_rejected_while_live(model):
    llm = _engine(model)
    llm.add_request("x", [1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("x", [1, 2], SamplingParams(max_tokens=3))


def _penalized_reference(model, prompt, n, rep=1.0, pres=0.0, freq=0.0):
    """A plain loop: full forward, then the penalties written out token by token, then argmax."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float().clone()
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= pres + freq * out.count(t)
        nxt = int(logits.argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("pen", [dict(rep=1.5), dict(pres=1.0, freq=0.5)])
def test_penalties_match_a_token_by_token_reference(model, k, pen):
    prompt = [9, 9, 4, 1]
    sp = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=pen.get("rep", 1.0),
                        presence_penalty=pen.get("pres", 0.0), frequency_penalty=pen.get("freq", 0.0))
    ref = _penalized_reference(model, prompt, 16, **pen)
    llm = _engine(model, num_speculative_tokens=k)
    oracle_drafts(llm, {tuple(prompt): ref})
    assert llm.generate([prompt], sp)[0].token_ids == ref
    assert ref != generate(model, prompt, 16), "the penalties changed nothing: the test would not see a bug"
    if k:
        assert llm.stats()["accepted_tokens"] >= 8, "verify rows after accepted drafts were not exercised"


def test_min_tokens_blocks_stop_ids(model):
    prompt = [2, 3, 4]
    first = generate(model, prompt, 1)[0]
    early = _engine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                             stop_token_ids=[first]))[0]
    assert early.token_ids == [first] and early.finish_reason == "stop"
    late = _engine(model, num_speculative_tokens=2).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first], min_tokens=4))[0]
    assert first not in late.token_ids[:4] and len(late.token_ids) >= 4


def test_processed_logprobs_are_the_sampled_distribution(model):
    prompt = [7, 8, 9, 10]
    sp = SamplingParams(max_tokens=6, temperature=0.7, top_k=5, top_p=0.9, seed=1, logprobs=2,
                        logprobs_mode="processed")
    out = _engine(model, num_speculative_tokens=0).generate([prompt], sp)[0]
    raw = _engine(model, num_speculative_tokens=0).generate([prompt], SamplingParams(
        **{**sp.__dict__, "logprobs_mode": "raw"}))[0]
    assert out.token_ids == raw.token_ids
    ids = list(prompt)
    for t, lp, rlp in zip(out.token_ids, out.logprobs, raw.logprobs):
        logits = model(torch.tensor([ids]))[0, -1].float()
        direct = probs_from_logits(logits, 0.7, 5, 0.9)[t].log().item()
        assert lp.logprob == pytest.approx(direct, abs=1e-5)
        assert rlp.logprob == pytest.approx(torch.log_softmax(logits, -1)[t].item(), abs=1e-5)
        assert lp.logprob > rlp.logprob  # truncation and temperature 0.7 concentrate the mass
        ids.append(t)


def test_arrival_time_is_taken_as_given(model):
    llm = _engine(model)
    t0 = time.monotonic() - 5.0
    llm.add_request("late", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0), arrival_time=t0)
    _, last = _drive(llm)
    m = last["late", 0].metrics
    assert m.arrival_time == t0 and m.queue_time >= 5.0 and m.time_to_first_token >= m.queue_time


# ---- the text layer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    texts = ["héllo wörld ünïcode ✓ 日本語 " * 20, "def f(x):\n    return x\n\n" * 20]
    return Tokenizer.train(texts, 400)


def test_text_stream_keeps_multibyte_characters_whole(tok):
    text = "日本語 ✓ héllo"
    ids = tok.encode(text)
    for size in (1, 2, 3):
        ts, parts = TextStream(tok), []
        for i in range(0, len(ids), size):
            parts.append(ts.push(ids[i:i + size]))
        parts.append(ts.finish())
        assert "".join(parts) == text and "\ufffd" not in "".join(parts[:-1])


@pytest.mark.parametrize("size", [1, 2, 5])
def test_text_stream_stops_before_a_split_stop_string_and_cuts_tokens(tok, size):
    text = "def f(x):\n    return x\n\ndef g"
    ids = tok.encode(text)
    ts, sent = TextStream(tok, stop=["\n\n", "zzz"]), ""
    for i in range(0, len(ids), size):
        sent += ts.push(ids[i:i + size])
        assert "\n\n" not in sent
    sent += ts.finish()
    assert sent == "def f(x):\n    return x" == ts.text and ts.stopped == "\n\n"
    kept = ids[:ts.num_tokens]
    assert tok.decode(kept).startswith(sent) and not tok.decode(kept[:-1]).startswith(sent)


def test_generate_cuts_text_ids_and_logprobs_at_a_stop_string(tok):
    model = make_model(vocab_size=tok.vocab_size)
    llm = LLM(model, tokenizer=tok, max_model_len=64, block_size=4)
    prompt = tok.encode("def f(x):")
    free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[stop], logprobs=0,
                                                ignore_eos=True))[0]
    assert out.text == free.text[:free.text.index(stop)] and out.finish_reason == "stop"
    assert out.stop_reason == stop and len(out.logprobs) == len(out.token_ids) < len(free.token_ids)
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    assert not llm.has_unfinished_requests()
