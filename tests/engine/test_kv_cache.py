"""The paged step view gives the same logits as a full forward, for mixed short and long segments."""

import torch
from tests.conftest import make_model

from mimo.engine.kv_cache import KVCache, Segment


def _segments(specs, block_base, window, B=4):
    """specs: list of (start, length); sequence i owns blocks block_base[i] + j (full and sliding), with the
    sliding blocks that are entirely out of the window marked freed."""
    segs = []
    for (start, length), base in zip(specs, block_base):
        n_blocks = -(-(start + length) // B)
        dead = max(0, start - window + 1) // B
        swa = [None] * dead + [base + j for j in range(dead, n_blocks)]
        segs.append(Segment(start, length, [base + j for j in range(n_blocks)], swa))
    return segs


def test_step_view_matches_full_forward_mixed_batch():
    model = make_model()
    cfg = model.config
    W = cfg.sliding_window
    cache = KVCache(cfg, 4, 250, 250, model.n_mtp)
    seqs = [torch.randint(0, cfg.vocab_size, (L,)) for L in (40, 23, 7)]
    base = [0, 75, 150]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        # step 1: prefill chunks of different lengths (one long, two short)
        done = [30, 12, 3]
        specs = [(0, d) for d in done]
        ids = torch.cat([s[:d] for s, d in zip(seqs, done)])[None]
        pos = torch.cat([torch.arange(d) for d in done])[None]
        h = model.forward_hidden(ids, pos, cache.view(_segments(specs, base, W)))
        outs = [[x] for x in model.logits(h)[0].split(done)]
        # following steps: mixed lengths until every sequence is complete
        while any(d < len(s) for d, s in zip(done, seqs)):
            take = [min(n, len(s) - d) for n, s, d in zip((5, 4, 1), seqs, done)]
            specs = [(d, t) for d, t in zip(done, take) if t > 0]
            live = [i for i, t in enumerate(take) if t > 0]
            ids = torch.cat([seqs[i][done[i]:done[i] + take[i]] for i in live])[None]
            pos = torch.cat([torch.arange(done[i], done[i] + take[i]) for i in live])[None]
            h = model.forward_hidden(ids, pos, cache.view(_segments(specs, [base[i] for i in live], W)))
            for i, x in zip(live, model.logits(h)[0].split([take[i] for i in live])):
                outs[i].append(x)
                done[i] += take[i]
    for f, o in zip(full, outs):
        assert (torch.cat(o) - f).abs().max() < 1e-5
