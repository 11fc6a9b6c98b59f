import pytest

from mimo.data import Tokenizer, load_corpus, mixed_documents
from mimo.train.recipes import get_stage

# small enough that a debug run is a couple of seconds, large enough for a 64-token window
CORPUS_BYTES = 40_000


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """One tokenizer for every test run (training a BPE per run would dominate the test time)."""
    corpus = load_corpus(max_bytes=CORPUS_BYTES)
    tok = Tokenizer.train(mixed_documents(corpus.texts("train"), mix=0.3), vocab_size=1024)
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(d)
    return d


@pytest.fixture
def debug_cfg(tmp_path, tokenizer_dir):
    """The debug recipe's pretrain stage, made smaller still."""
    return get_stage("debug", "pretrain").replace(
        out=str(tmp_path / "run"), tokenizer=str(tokenizer_dir), corpus_max_bytes=CORPUS_BYTES, steps=6,
        warmup_steps=1, eval_every=3, ckpt_every=3, eval_batches=1, progress=False)
