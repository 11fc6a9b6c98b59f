"""Corpus and its split, mixed documents, PackedStream and SFTLoader (determinism, resume, shards, masks)."""

import hashlib
import json
from itertools import islice

import numpy as np
import pytest
import torch

from mimo.data.corpus import (
    CorpusInfo,
    is_val_file,
    list_files,
    load_corpus,
    mixed_documents,
    stdlib_dir,
    task_documents,
)
from mimo.data.loader import IGNORE_INDEX, PackedStream, SFTLoader, sft_batches, tokenize_documents
from mimo.data.tokenizer import Tokenizer, render_chat
from mimo.tasks import generate_examples, mixed_examples, to_messages


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_files=24)


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(corpus.texts() + task_documents(30), 400)


@pytest.fixture(scope="module")
def docs(corpus):
    return mixed_documents(corpus.texts()[:10], mix=0.2)


# ---- corpus ---------------------------------------------------------------------------------------------


def test_corpus_split_is_by_file_and_deterministic(corpus):
    """Train and validation hold different files, each on the side the path hash says, and reloads agree."""
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.val}
    assert train and val and not train & val
    assert all(is_val_file(n, 0.05) for n in val) and not any(is_val_file(n, 0.05) for n in train)
    assert corpus.info.n_files_train + corpus.info.n_files_val == 24
    again = load_corpus(max_files=24)
    assert again.info == corpus.info and again.train == corpus.train


def test_corpus_skips_site_packages_and_tests():
    """Only standard-library sources: no site-packages, caches, test directories or build settings."""
    names = list_files()
    assert len(names) > 300
    for part in ("site-packages/", "__pycache__/", "test/", "tests/", "idle_test/", "_sysconfigdata"):
        assert not any(f"/{part}" in "/" + n for n in names), part
    assert any(n.startswith("test/") for n in list_files(include_tests=True))


def test_corpus_limits_never_move_files_between_splits():
    """A limited corpus takes its validation files from the full corpus's validation files only."""
    full_val = {n for n in list_files() if is_val_file(n, 0.05)}
    small = load_corpus(max_bytes=150_000)
    assert {d.name for d in small.val} <= full_val
    assert not {d.name for d in small.train} & full_val
    assert small.info.bytes_train + small.info.bytes_val <= 150_000 + max(len(d.text) for d in small.val)


def test_corpus_info_hash_and_json(corpus, tmp_path):
    """The info hash is the sha256 over sorted (relpath, content sha256) lines; the JSON round-trips."""
    h = hashlib.sha256()
    for d in sorted(corpus.train + corpus.val, key=lambda d: d.name):
        h.update(f"{d.name}\t{hashlib.sha256(d.text.encode()).hexdigest()}\n".encode())
    assert corpus.info.sha256 == h.hexdigest()
    corpus.info.save(tmp_path / "corpus.json")
    assert CorpusInfo.load(tmp_path / "corpus.json") == corpus.info
    assert str(stdlib_dir()) not in (tmp_path / "corpus.json").read_text()


def test_corpus_from_explicit_directory(tmp_path):
    """Undecodable and empty files are skipped and counted; test and site-packages directories are skipped."""
    for rel, data in {
        "a.py": b"x = 1\n",
        "pkg/b.py": "s = 'ünïcode'\n".encode(),
        "pkg/empty.py": b"",
        "bad.py": b"\xff\xfe not utf-8",
        "tests/test_a.py": b"assert True\n",
        "site-packages/dep.py": b"y = 2\n",
        "notes.txt": b"not python\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    c = load_corpus(tmp_path, val_fraction=0.5)
    assert sorted(d.name for d in c.train + c.val) == ["a.py", "pkg/b.py"]
    assert c.info.n_skipped_undecodable == 1 and c.info.source == "directory"


def test_missing_corpus_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        load_corpus(missing)


def test_mixed_documents_ratio_and_format(corpus):
    """Task documents are chat-rendered train examples making up about `mix` of the characters."""
    code = corpus.texts()
    mixed = mixed_documents(code, mix=0.25)
    assert mixed[: len(code)] == code
    tasks_part = mixed[len(code) :]
    share = sum(map(len, tasks_part)) / sum(map(len, mixed))
    assert 0.22 < share < 0.28
    first = generate_examples("add", 1)[0]
    assert tasks_part[0] == render_chat(to_messages(first))
    assert mixed_documents(code, mix=0.0) == code
    held = mixed_documents(code[:3], mix=0.25, task_split="heldout")[3]
    assert held == render_chat(to_messages(generate_examples("add", 1, "heldout")[0]))
    with pytest.raises(ValueError):
        mixed_documents(code, mix=1.0)


# ---- PackedStream ---------------------------------------------------------------------------------------


def take(stream, n):
    return [b.clone() for b in islice(stream, n)]


def test_packed_stream_layout(tok, docs):
    """Batches are int64 [B, T+1]; rows and batches overlap by one token and read the stream in order."""
    B, T = 4, 16
    s = PackedStream(docs, tok, B, T, seed=0, shuffle=False)
    batches = take(s, 3)
    assert all(b.shape == (B, T + 1) and b.dtype == torch.int64 for b in batches)
    rows = [r for b in batches for r in b]
    flat = torch.cat([rows[0][:1]] + [r[1:] for r in rows])
    for prev, row in zip(rows, rows[1:]):
        assert row[0] == prev[-1]
    all_ids, _ = tokenize_documents(docs, tok)
    assert flat.tolist() == all_ids[: len(flat)].tolist()
    assert all_ids[len(tok.encode(docs[0]))] == tok.eot_id


def test_packed_stream_epochs_are_shuffled_permutations(tok, docs):
    """An epoch holds each document once, each followed by <|endoftext|>; order varies by epoch and seed."""
    s = PackedStream(docs, tok, 2, 8, seed=5)
    e0, e1 = s._epoch_tokens(0), s._epoch_tokens(1)
    assert sorted(e0.tolist()) == sorted(s.tokens.tolist()) == sorted(e1.tolist())
    assert not np.array_equal(e0, e1)
    assert (e0 == tok.eot_id).sum() == len(docs)
    other = PackedStream(docs, tok, 2, 8, seed=6)
    assert not np.array_equal(other._epoch_tokens(0), e0)


def test_packed_stream_is_deterministic(tok, docs):
    a = take(PackedStream(docs, tok, 4, 32, seed=1), 5)
    b = take(PackedStream(docs, tok, 4, 32, seed=1), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_packed_stream_exact_resume_across_epochs(tok, docs):
    """A stream restored from state_dict (via JSON) yields exactly the batches of the uninterrupted stream."""
    s = PackedStream(docs, tok, 4, 24, seed=3, max_tokens=600)  # ~6 batches per epoch
    reference = take(s, 20)
    s2 = PackedStream(docs, tok, 4, 24, seed=3, max_tokens=600)
    take(s2, 7)
    state = json.loads(json.dumps(s2.state_dict()))
    assert state["epoch"] >= 1
    s3 = PackedStream(docs, tok, 4, 24, seed=3, max_tokens=600)
    s3.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(s3, 13), reference[7:]))
    s3.reset()
    assert torch.equal(next(s3), reference[0])


def test_packed_stream_state_mismatch_is_refused(tok, docs):
    state = PackedStream(docs, tok, 4, 24, seed=3).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(docs, tok, 4, 16, seed=3).load_state_dict(state)


def test_packed_stream_max_tokens(tok, docs):
    s = PackedStream(docs, tok, 2, 8, max_tokens=300)
    assert s.tokens_per_epoch == 300 and s.tokens.dtype == np.uint16


@pytest.mark.parametrize("world_size", [2, 4])
def test_packed_stream_rank_shards_concatenate_to_global_batch(tok, docs, world_size):
    """Ranks get disjoint contiguous row blocks whose concatenation is the single-process batch."""
    kw = dict(seed=7, max_tokens=500)
    single = take(PackedStream(docs, tok, 8, 16, **kw), 10)
    shards = [
        take(PackedStream(docs, tok, 8, 16, rank=r, world_size=world_size, **kw), 10)
        for r in range(world_size)
    ]
    for step in range(10):
        assert shards[0][step].shape == (8 // world_size, 17)
        assert torch.equal(torch.cat([sh[step] for sh in shards]), single[step])


def test_shard_arguments_are_checked(tok, docs):
    with pytest.raises(ValueError):
        PackedStream(docs, tok, 6, 8, rank=0, world_size=4)
    with pytest.raises(ValueError):
        PackedStream(docs, tok, 8, 8, rank=4, world_size=4)


# ---- SFTLoader ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convs():
    return [to_messages(ex) for ex in mixed_examples(12)]


def test_sft_mask_covers_exactly_the_assistant_tokens(tok, convs):
    """Per row, the supervised targets decode to '{answer}<|im_end|>', and inputs/targets are shifted ids."""
    loader = SFTLoader(convs, tok, 6, shuffle=False)
    batch = next(loader)
    x, y, m = batch["input_ids"], batch["targets"], batch["loss_mask"]
    assert x.shape == y.shape == m.shape and m.dtype == torch.float32
    for row in range(6):
        conv = convs[row]
        ids = tok.encode_chat(conv)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (
            (x[row, n:] == tok.pad_id).all()
            and (y[row, n:] == IGNORE_INDEX).all()
            and (m[row, n:] == 0).all()
        )
        supervised = y[row][m[row].bool()].tolist()
        assert tok.decode(supervised) == conv[-1]["content"] + "<|im_end|>"
        assert supervised[-1] == tok.eos_id
        assert (y[row][~m[row].bool()] == IGNORE_INDEX).all()
        assert torch.equal(y[row, :n][m[row, :n].bool()], torch.tensor(ids[1:])[m[row, :n].bool()])
    assert x.shape[1] == max(len(tok.encode_chat(c)) for c in convs[:6]) - 1


def test_sft_mask_multi_turn_and_reasoning(tok):
    """Every assistant turn is supervised (reasoning onwards when given); headers and think prefix are not."""
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add 1 2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "add 2 2"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2"},
    ]
    batch = next(SFTLoader([conv], tok, 1))
    supervised = batch["targets"][0][batch["loss_mask"][0].bool()].tolist()
    assert tok.decode(supervised) == "3<|im_end|>2+2\n</think>\n\n4<|im_end|>"


def test_sft_resume_determinism_and_sharding(tok, convs):
    """Same seed, same batches; a restored loader continues exactly; ranks concatenate to the global batch."""
    ref = list(islice(SFTLoader(convs, tok, 8, seed=2), 12))  # 36 conversations: crosses epochs
    again = SFTLoader(convs, tok, 8, seed=2)
    list(islice(again, 5))
    resumed = SFTLoader(convs, tok, 8, seed=2)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    for got, want in zip(islice(resumed, 7), ref[5:]):
        assert all(torch.equal(got[k], want[k]) for k in want)
    shards = [list(islice(SFTLoader(convs, tok, 8, seed=2, rank=r, world_size=2), 12)) for r in range(2)]
    for step in range(12):
        for k in ref[step]:
            assert torch.equal(torch.cat([shards[0][step][k], shards[1][step][k]]), ref[step][k])
    assert any(
        not torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(ref, islice(SFTLoader(convs, tok, 8, seed=3), 12))
    )


def test_sft_epoch_visits_each_conversation_once(tok, convs):
    loader = SFTLoader(convs, tok, 4, seed=0)
    assert loader.batches_per_epoch == 9
    seen = [tuple(row.tolist()) for b in islice(loader, 9) for row in b["input_ids"]]
    expected = [tuple(tok.encode_chat(c)[:-1]) for c in convs]
    assert sorted(tuple(t for t in s if t != tok.pad_id) for s in seen) == sorted(expected)


def test_sft_max_len_and_sft_batches(tok, convs):
    batches = list(sft_batches(convs, tok, 4, num_batches=3, max_len=10))
    assert len(batches) == 3 and all(b["input_ids"].shape[1] <= 10 for b in batches)
