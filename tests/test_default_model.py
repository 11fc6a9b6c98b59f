"""The bundled default model: loads in mimo and transformers with the same logits, and the engine's greedy
output (MTP drafts on) equals the reference generate on a code prompt and a chat task prompt."""

import torch

import mimo
from mimo.engine.llm import DEFAULT_MODEL
from mimo.model import generate


def test_default_model_logits_match_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = mimo.load_model(DEFAULT_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    ids = torch.tensor([tok("def fibonacci(n):\n    if n < 2:\n        return n\n")["input_ids"]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    assert model.n_mtp == 3


def test_default_engine_greedy_equals_reference_with_mtp():
    llm = mimo.LLM(max_model_len=512, max_num_seqs=4)
    assert llm.config.num_speculative_tokens == 3
    tok = llm.tokenizer
    prompts = [tok.encode("import os\n\n\ndef main():\n"),
               tok.encode_chat([{"role": "user", "content": "reverse hello"}])]
    outs = llm.generate(prompts, mimo.SamplingParams(max_tokens=24, temperature=0))
    for o, p in zip(outs, prompts):
        assert o.token_ids == generate(llm.model, p, 24, eos_token_id=tok.eos_id)
    assert llm.stats()["drafted_tokens"] > 0
