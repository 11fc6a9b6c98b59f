"""Shared engine-test helpers: a draft source that makes verification accept multi-token runs.

The random test heads agree with the random main model almost never, so with their drafts every verify step
rejects everything and "MTP on == off" holds trivially. `oracle_drafts` replaces the drafts by the known
reference continuation with one deliberate error per round at a cycling position, so a test sees every
acceptance length from 0 drafts to all of them (plus the bonus), and a broken accept/rollback changes output.
"""

from __future__ import annotations

import itertools


def oracle_drafts(llm, refs: dict[tuple[int, ...], list[int]]) -> None:
    """Wrap `llm.runner.draft` so its drafts come from refs[prompt] (the greedy continuation of that prompt).

    The real drafting round still runs first (its MTP caches and adaptive skips stay exercised), then the
    drafts of every sequence the engine asked for are overwritten, nd of them whatever the adaptive policy
    chose, so every acceptance length is reached (the draft guard is pinned to drafting).
    Round r of a sequence drafting nd tokens makes draft (nd - r % (nd + 1)) wrong: the first round proposes
    all nd correctly, the next nd - 1, ..., then none, and again.
    """
    real = llm.runner.draft
    llm._guard.mode = lambda batch: True  # drafts every step: the timing guard must not switch drafting off
    V = llm.model.config.vocab_size
    rounds: dict[str, itertools.count] = {}

    def draft(seqs, states, nds, floors=None, private=None):
        real(seqs, states, nds, floors, private)
        for seq, st, nd in zip(seqs, states, nds):
            r = next(rounds.setdefault(seq.request_id, itertools.count()))
            ref = refs[tuple(seq.prompt_token_ids)]
            n = seq.num_output_tokens  # the pending token is ref[n - 1]; drafts stand for ref[n:n + nd]
            d = (ref[n:n + nd] + [0] * nd)[:nd]
            wrong = nd - r % (nd + 1)
            if wrong < nd:
                d[wrong] = (d[wrong] + 1) % V
            st.drafts = d

    llm.runner.draft = draft


def drive(llm, prompts, params) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Run prompts through add_request / step; returns each prompt's tokens and, for every decode delta,
    (the sequence's committed length before the step, tokens committed)."""
    ids = [llm.add_request(None, p, params) for p in prompts]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    commits = []
    while llm.has_unfinished_requests():
        before = {s.request_id: s.num_computed_tokens for s in llm.scheduler.running if not s.is_prefill}
        for d in llm.step():
            if toks[d.request_id] and d.new_token_ids:
                commits.append((before.get(d.request_id, -1), len(d.new_token_ids)))
            toks[d.request_id] += d.new_token_ids
    return [toks[i] for i in ids], commits
