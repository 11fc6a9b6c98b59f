"""MTP self-distillation moves only the heads, toward the main model's own predictions."""

import torch

from mimo.train.distill_mtp import distill_loss
from tests.conftest import make_model


def test_distillation_raises_agreement_and_leaves_the_main_model_alone():
    model = make_model(vocab_size=64)
    x = torch.randint(0, 64, (4, 24))
    with torch.no_grad():
        logits_before = model(x)
    heads = list(model.model.mtp.parameters())
    for p in model.parameters():
        p.requires_grad_(any(p is h for h in heads))
    opt = torch.optim.AdamW(heads, lr=3e-3)
    first, agree0 = distill_loss(model, x)
    for _ in range(40):
        loss, _ = distill_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, agree1 = distill_loss(model, x)
    assert last.item() < first.item() - 0.1
    assert sum(agree1) > sum(agree0)
    with torch.no_grad():
        assert torch.equal(model(x), logits_before)


class _CharTokenizer:
    def encode(self, text):
        return [4 + ord(c) % 60 for c in text]


def test_generated_rows_are_prompt_spans_plus_the_models_greedy_continuation():
    from mimo.model import generate
    from mimo.train.distill_mtp import generated_rows

    model = make_model(vocab_size=64).eval()
    tok = _CharTokenizer()
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n\nclass B(A):\n    pass\n"]
    rows = generated_rows(model, tok, texts, n_rows=3, length=20, prompt_len=6, seed=1)
    assert rows.shape == (3, 20)
    encoded = [tok.encode(t) for t in texts]
    for row in rows.tolist():
        prompt = row[:6]
        assert any(prompt == e[a:a + 6] for e in encoded for a in range(len(e) - 5))
        assert row[6:] == generate(model, prompt, 14)


def test_task_rows_are_one_conversation_each_the_models_own_greedy_answer_padded_out_of_the_mask():
    from mimo import tasks as task_lib
    from mimo.data import Tokenizer
    from mimo.engine.llm import DEFAULT_MODEL
    from mimo.model import generate
    from mimo.train.distill_mtp import task_rows

    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    model = make_model(vocab_size=tok.vocab_size).eval()
    rows, mask = task_rows(model, tok, n_rows=4, split="heldout", seed=3)
    examples = task_lib.mixed_examples(2, "heldout", 3)[:4]
    assert rows.shape[0] == 4 and mask.shape == rows.shape
    assert task_lib.prompt_ids(tok, examples[0], thinking=False) != task_lib.prompt_ids(tok, examples[0])  # add thinks
    for i, (row, m, ex) in enumerate(zip(rows.tolist(), mask.tolist(), examples)):
        prompt = task_lib.prompt_ids(tok, ex, thinking=i % 2 == 0)
        want = prompt + generate(model, prompt, task_lib.MAX_NEW_TOKENS, eos_token_id=tok.eos_id)
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)
        assert row[:n] == want and set(row[n:]) <= {tok.pad_id}


def test_distill_loss_with_a_mask_ignores_right_padding():
    model = make_model(vocab_size=64).eval()
    x = torch.randint(1, 64, (1, 12))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 12 + [False] * 5])
    with torch.no_grad():
        loss, agree = distill_loss(model, x)
        masked, masked_agree = distill_loss(model, padded, mask)
        unmasked, _ = distill_loss(model, padded)
    torch.testing.assert_close(masked, loss)
    assert masked_agree == agree
    assert (unmasked - loss).abs() > 1e-3  # the padding would count without the mask
