"""The sft-start recipe's SFT data: task shares, answers spelled one character per token, length-grouped
batches (every conversation once per epoch, less padding, resumable)."""

import json
from itertools import islice

import numpy as np
import pytest

from mimo import tasks as task_lib
from mimo.data import SFTLoader, Tokenizer
from mimo.engine.llm import DEFAULT_MODEL
from mimo.train.config import SFTData, TrainConfig
from mimo.train.data import DataError, sft_train_examples, spelled_answer_encoder
from mimo.train.recipes import final_stage, get_recipe, get_stage


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(DEFAULT_MODEL)


def test_spelled_answers_keep_the_inference_prompt(tok):
    encode = spelled_answer_encoder(tok)
    for t in task_lib.TASKS:
        for ex in task_lib.generate_examples(t, 50, seed=0):
            ids, mask = encode(task_lib.to_messages(ex))
            ref_ids, ref_mask = tok.encode_chat_with_mask(task_lib.to_messages(ex))
            prompt = tok.encode_chat(task_lib.to_messages(ex, with_answer=False), add_generation_prompt=True)
            n = len(ex.answer)
            assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
            answer = ids[len(prompt):len(prompt) + n]
            assert [tok.decode([i]) for i in answer] == list(ex.answer)
            assert mask[len(prompt):] == [True] * (n + 1) + [False]
            # the closing <|im_end|> and newline are the usual ones
            assert ids[len(prompt) + n:] == ref_ids[-2:] and ref_mask[-2:] == [True, False]


def test_reverse_answers_differ_from_bpe(tok):
    """The point of spelling: BPE writes most reversed strings with multi-letter tokens."""
    encode = spelled_answer_encoder(tok)
    examples = task_lib.generate_examples("reverse", 50, seed=0)
    longer = sum(len(encode(task_lib.to_messages(ex))[0]) > len(tok.encode_chat_with_mask(
        task_lib.to_messages(ex))[0]) for ex in examples)
    assert longer > 40


def test_spelled_reasoning_keeps_the_think_markup(tok):
    """With reasoning, the trace and the answer are spelled and `</think>` stays one token; the prompt is the
    thinking-on inference prompt; sort is unchanged by the option."""
    encode = spelled_answer_encoder(tok)
    for t in task_lib.TASKS:
        for ex in task_lib.generate_examples(t, 30, seed=0):
            ids, mask = encode(task_lib.to_messages(ex, reasoning=True))
            prompt = task_lib.prompt_ids(tok, ex)
            assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
            body = [tok.decode([i]) for i in ids[len(prompt):-2]]
            if t in task_lib.THINKING:
                want = list(task_lib.trace(ex) + "\n") + ["</think>"] + list("\n\n" + ex.answer)
            else:
                want = list(ex.answer)
                assert (ids, mask) == encode(task_lib.to_messages(ex))
            assert body == want
            assert task_lib.check(t, task_lib.completion_text(tok, ids[len(prompt):]), ex.answer)


def test_stages_chain_in_recipe_order():
    """`mimo recipe` runs a recipe's stages in dict order and its result is the last stage's checkpoint."""
    stages = get_recipe("sft-start", "r")
    assert list(stages) == ["pretrain", "mtp", "sft", "think", "reverse", "reverse2", "reverse3", "reverse4",
                            "mix", "mix2", "mix3"]
    assert final_stage(stages) is stages["mix3"]
    for before, after in zip(list(stages.values()), list(stages.values())[1:]):
        assert after.init_from == before.out
    assert stages["think"].seed != stages["sft"].seed  # new conversations, not the first stage's again
    assert stages["think"].sft_data.reasoning and not stages["sft"].sft_data.reasoning
    assert list(get_recipe("tiny")) == ["pretrain", "mtp", "sft"]
    # the default model's MOPD start: mix3 once more from its export, on new conversations
    mix4, mix3 = get_stage("student-start", "mix4"), stages["mix3"]
    assert mix4.init_from == "models/sft-start" and mix4.seed != mix3.seed
    assert mix4.replace(init_from=mix3.init_from, seed=mix3.seed, out=mix3.out, recipe=mix3.recipe) == mix3
    # then the current default's start: from mix4's export, new conversations, reverse the largest share
    mix5 = get_stage("student-start", "mix5")
    assert mix5.init_from == "models/student-start" and mix5.seed not in (mix3.seed, mix4.seed)
    weights = dict(mix5.sft_data.task_weights)
    assert set(weights) == set(task_lib.TASKS) and max(weights, key=weights.get) == "reverse"
    assert mix5.lr < mix4.lr and mix5.steps == mix4.steps


def test_task_weights_set_the_shares():
    cfg = get_stage("sft-start", "sft").replace(steps=10, warmup_steps=1, batch_size=100)
    examples = sft_train_examples(cfg, (("add", 2.0), ("reverse", 2.0), ("sort", 1.0)))
    counts = {t: sum(ex.task == t for ex in examples) for t in task_lib.TASKS}
    assert counts == {"add": 400, "reverse": 400, "sort": 200}
    assert all(not task_lib.is_heldout(ex.prompt) for ex in examples)
    assert len({ex.prompt for ex in examples}) == len(examples)
    # no weights: the equal interleaved mix every other recipe trains on
    assert sft_train_examples(cfg) == task_lib.mixed_examples(334, "train", cfg.seed, cfg.tasks)
    for bad in ((("add", 1.0), ("sort", 1.0)), (("add", 1.0), ("reverse", 0.0), ("sort", 1.0))):
        with pytest.raises(DataError):
            sft_train_examples(cfg, bad)


def test_sft_data_is_part_of_the_stage_config():
    assert get_stage("tiny", "sft").sft_data == get_stage("debug", "sft").sft_data == SFTData()
    opts = get_stage("sft-start", "sft").sft_data
    assert opts.spell_answers and opts.task_weights is not None and opts.replay_task_fraction > 0
    assert all(c.sft_data.reasoning and c.sft_data.spell_answers for c in get_recipe("teacher-sft").values())
    cfg = get_stage("sft-start", "think")
    assert TrainConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict()))) == cfg  # train_config.json
    with pytest.raises(ValueError, match="replay_task_fraction"):
        SFTData(replay_task_fraction=1.5)


def _convs(n=300):
    return [task_lib.to_messages(ex) for ex in task_lib.mixed_examples(n, "train", 0)]


def test_group_by_length_covers_each_epoch_once_with_less_padding(tok):
    convs = _convs()
    grouped = SFTLoader(convs, tok, 16, seed=1, group_by_length=True)
    plain = SFTLoader(convs, tok, 16, seed=1)
    assert sorted(grouped._perm(0).tolist()) == list(range(len(convs)))
    assert grouped._perm(0).tolist() != grouped._perm(1).tolist()
    n = len(convs) // 16
    pad_grouped = sum(int((b["input_ids"] == tok.pad_id).sum()) for b in islice(grouped, n))
    pad_plain = sum(int((b["input_ids"] == tok.pad_id).sum()) for b in islice(plain, n))
    assert pad_grouped < pad_plain / 2
    # batches are not sorted by length across the epoch (the batch order is shuffled)
    lengths = [len(grouped.ids[i]) for i in grouped._perm(0)[::16]]
    assert lengths != sorted(lengths)


def test_group_by_length_resumes_exactly(tok):
    convs = _convs(100)
    ref = list(islice(SFTLoader(convs, tok, 16, seed=2, group_by_length=True), 30))  # crosses epochs
    first = SFTLoader(convs, tok, 16, seed=2, group_by_length=True)
    list(islice(first, 13))
    resumed = SFTLoader(convs, tok, 16, seed=2, group_by_length=True)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(ref[13:], islice(resumed, 17)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError):
        SFTLoader(convs, tok, 16, seed=2).load_state_dict(first.state_dict())
    # a state from before the option existed resumes an ungrouped loader
    old = {k: v for k, v in SFTLoader(convs, tok, 16, seed=2).state_dict().items() if k != "group_by_length"}
    SFTLoader(convs, tok, 16, seed=2).load_state_dict(old)


def test_replay_batch_holds_task_documents(tokenizer_dir):
    """sft-start's packed micro-batch replays code + task documents; other recipes' holds code only."""
    from mimo.train.data import StageData, build_corpus, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    im_start = tok.encode_chat([{"role": "user", "content": "x"}])[0]
    share = {}
    for recipe in ("sft-start", "debug"):
        cfg = get_stage("debug", "sft").replace(corpus_max_bytes=40_000, steps=4, batch_size=8, seq_len=64,
                                                code_fraction=0.2, tokenizer=str(tokenizer_dir),
                                                sft_data=get_stage(recipe, "sft").sft_data)
        data = StageData(cfg, tok, build_corpus(cfg))
        share[recipe] = float((data.code.tokens == im_start).mean())
    assert share["debug"] == 0.0 and share["sft-start"] > 0.01
