"""ModelRunner: turns scheduled sequences into one flattened model call over the paged cache, and runs the
MTP blocks to draft tokens.

Main step: every item's query tokens are concatenated into input_ids [1, N] with their positions; the model
attends through `KVCache.view(segments)`. Only the rows that are sampled or verified go through lm_head.

MTP drafting, non-chain, as SGLang runs MiMo-V2-Flash (engine-notes §4.2). With committed tokens x_0..x_n
(x_n pending, the main model holds KV of 0..n-1 and hidden states h_t):
  block k at position t takes (h_t, x_{t+k+1}) and its output at t = n - 1 drafts x_{n+k+1};
  tokens beyond x_n are the drafts made earlier in the same round: block 0 drafts d1 = x_{n+1}, block 1 reads
  d1 at t = n - 1 and drafts d2, block 2 reads d1 at t = n - 2 and d2 at t = n - 1 and drafts d3.
An entry of block k at position t is final once x_{t+k+1} is committed, i.e. for t < n - k; entries from
drafts are recomputed in the next round that runs block k, which starts at its first non-final position (its
`valid` mark). An MTP block is a single layer, so its K/V at t depend on its inputs at t only, and only the
output of the last row (t = n - 1, which reads keys [n - W, n)) is used: the rows before it are run only to
write their K/V. So a block may skip rounds (adaptive drafting) and catch up later from max(valid, n - W),
and no row reads keys below n - W (they may be freed or never computed).

Reduced draft vocabulary (FR-Spec, Zhao et al. 2025): the heads pick their argmax among the `draft_vocab`
most frequent token ids only (byte-level BPE ids are in merge order, which follows frequency), so the
drafting lm_head reads a quarter of the weights. Verification uses the full head, so outputs do not change;
a draft outside the set is just never proposed. `draft_vocab_size=V` is the full-vocabulary reference.

Adaptive drafting: each draft comes with its head probability c (at the request's temperature), turned
into an acceptance estimate a: greedy, a = min(1, rate_k(c) f) with rate_k(c) head k's recent acceptance
rate (all requests) among drafts of about that probability (`BUCKETS`), counted over every draft a round
computed, proposed or cut (`MTPState.resolve`); sampled, a = min(1, c f), since an
argmax draft is accepted with its target probability, which a distilled head's probability estimates; f is
how the request's own drafts fared against their estimates recently. The chain estimate P_i is the product
of a over d_1..d_i. The verify step's expected tokens are 1 + P_1 + .. + P_k and its cost 1 + r + f k plain
decode steps (k > 0), f = the cost of one draft (`draft_floor`, growing with the batch), r the round's fixed
cost (`ROUND_SHARE` f, shared by the batch). Drafting picks the k with the most expected tokens per unit of
cost, looking ahead: drafts not yet made count at the request's recent estimates for their blocks. A block
runs only if some chain through it beats the chain without it, so a request whose expected chain does not
pay skips the round; a chain ends at the first draft that no longer pays with the blocks after it, and is
then cut to its best prefix by the drafts' actual estimates. After `PROBE_EVERY` steps without a draft the
first draft is proposed whatever its estimate, so a low estimate gets tested again. Greedy
output does not depend on any of this (verification decides); sampled output stays exact because the drafts
are still argmax picks (a point mass q) and how many are proposed depends only on what is already known.

Compiled steps (`compile=True`): a step whose segments are all short (decode, verify, drafting blocks) runs
the model as a torch.compile graph with dynamic shapes (one graph per kind of step, not per batch size or
context length); the MoE then routes through static-shape expert paths (model/moe.py). Prefill chunks, a
drafting block's first window-long extend and steps that record routing stay eager. Each call is one graph
without guards on the model's modules (`_compiled`). Default model, batch-1 greedy code, two threads,
interleaved in one process: MTP off 3.54 -> 1.82 ms/token, three drafts every step 2.84 -> 1.90 (compiled,
drafting no longer pays at batch 1: a compiled engine times it from one request on); compiling costs
~20-30 s per graph on a 2-core CPU.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from mimo.engine.config import GREEDY_EPS
from mimo.engine.kv_cache import KVCache, Segment, long_tensor
from mimo.engine.sequence import Sequence

DECAY = 0.9  # per verify step, for a request's factor: about its last ten steps count
HEAD_DECAY = 0.98  # per examined draft, for a head's calibration (all requests): about the last fifty per bucket
BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)  # head-probability buckets of the calibration
PRIOR_RATE = 0.7  # acceptance a bucket and a new request's blocks start from: high enough that they draft
# pseudo-drafts of PRIOR_RATE each bucket starts from: with one, a few rejections of a poor request sank a
# rarely seen bucket to 0.35 and the next requests, whose drafts there were accepted, stopped drafting
BUCKET_PRIOR = 4.0
FIRST_DECAY = 0.7  # per round, for a request's estimate of a block's draft: a probe that pays resumes soon
RETRY = 0.05  # per skipped block: how fast a block's low estimate drifts back up so the block is retried
PRIOR = 2.0  # pseudo-drafts a request's factor starts from (factor 1)
# steps without a draft after which a request proposes one anyway (a probe costs ~0.6 steps at batch 1), below
# DraftGuard.MIN_BATCH and from it. With 16 (and one pseudo-draft per bucket) a code request that met two
# rejections early drafted 4 times in 64 tokens where three drafts every step were accepted 1.4-2.3 a step.
# Default model, greedy, batch 1, step costs modelled from draft_floor over the drafts and blocks actually run:
# 16 -> 6 (with BUCKET_PRIOR 1 -> 4) took code from 1.17x to 1.24x MTP off on the benchmark's prompts and
# 1.06x -> 1.18x on 12 held-out stdlib prefixes, chat tasks 1.03x -> 1.05x and 1.08x -> 1.09x. At 64
# requests, timed in four interleaved rounds, 6 lost: chat tasks 0.98x -> 0.89x MTP off, sampled 0.96x -> 0.93x
PROBE_EVERY = (6, 16)
# the batch a seeded sampled request's costs assume: fixed, its tokens must not depend on it; the largest the
# benchmark runs, since sampled drafts are accepted less (temperature 0.7 code, one draft: 0.90x at batch 1)
SEEDED_BATCH = 64
ROUND_SHARE = 0.35  # a drafting round's fixed cost (views, bookkeeping), as a share of a draft's cost


def _compiled(fn):
    """fn as a torch.compile graph with dynamic shapes, called with duck sizing off: sizes that happen to be
    equal in the first compiled step (e.g. 23 keys in both pools) are otherwise assumed equal forever, and the
    next step recompiles.

    One graph per call (fullgraph: a graph break is an error) and without the guards on nn modules: dynamo
    checked ~5,000 guards per call (every parameter's tensor match, every module's type and attributes), ~0.6
    ms of a 2.4 ms compiled decode step on one thread, ~0.2 ms with this filter (cProfile of the same run).
    They can go because fn is a method of the engine's own model, whose modules never change and whose weights
    change only in place (`LLM.update_weights`: the graph reads the parameters at every call; inductor's own
    stride checks stay); the guards on the step's inputs (ids, positions, the cache view's tensors and flags,
    the MTP block index) stay, so a new kind of step still compiles a graph of its own. Both need the single
    graph: after a break, the resumed pieces inside the layers are shared by all layers, and only the module
    guards told them apart (with the break DerivedWeights.caches once had, this filter made the compiled
    engine's greedy tokens differ from eager ones). vLLM drops every guard of its compiled model.
    """
    graph = torch.compile(fn, dynamic=True, fullgraph=True,
                          options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def call(*args):
        # set and restored by hand: the two configs' patch() context managers cost 41 us a call, this 7
        dyn, fx = torch._dynamo.config, torch.fx.experimental._config
        before = dyn.recompile_limit, fx.use_duck_shape
        dyn.recompile_limit, fx.use_duck_shape = RECOMPILE_LIMIT, False
        try:
            return graph(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # more kinds of step than that: the rest run eager, as dynamo does by itself without fullgraph
            # (it raises before running anything, so nothing ran twice)
            return fn(*args)
        finally:
            dyn.recompile_limit, fx.use_duck_shape = before
    return call


# graphs per compiled function: the drafting blocks need one per block index and per masked or unmasked
# attention, among others (with dynamo's default of 8 the benchmark's compiled run sent the default model's
# later kinds of drafting block to eager)
RECOMPILE_LIMIT = 32


class TimingGuard:
    """Which of two ways to run a step (mode True or False) is faster, measured: per size bucket (1, 2-3, 4-7,
    8-15, ...) the decayed tokens per second of the steps run each way. It keeps the faster mode and runs the
    other one for a few steps now and then (EXPLORE_STEPS every `interval` steps; the interval doubles while
    the same mode keeps winning), so a change of load or machine is noticed. Mode True is measured first.
    Plain Python: the caller times the steps."""

    DECAY = 0.9  # per counted step of a bucket and mode: about the last ten count
    MIN_STEPS = 3  # counted steps of each mode before they are compared
    EXPLORE_STEPS = 6  # steps of the other mode per exploration (the first is not counted)
    FIRST_INTERVAL, MAX_INTERVAL = 12, 192  # steps of the preferred mode between explorations

    def __init__(self) -> None:
        # bucket -> per mode [decayed tokens, decayed seconds, steps]
        self.stats: dict[Hashable, dict[bool, list[float]]] = {}
        self.interval: dict[Hashable, int] = {}
        self.clock: dict[Hashable, int] = {}  # steps since the bucket's last exploration began
        self.best: dict[Hashable, bool] = {}

    @staticmethod
    def bucket(size: int | tuple[int, ...]) -> int | tuple[int, ...]:
        """Steps are compared within a bucket of sizes: an int by its bit length, a tuple element by element."""
        return size.bit_length() if isinstance(size, int) else tuple(x.bit_length() for x in size)

    def rate(self, b: Hashable, mode: bool) -> float | None:
        tok, sec, n = self.stats.get(b, {}).get(mode, (0.0, 0.0, 0))
        return tok / sec if n >= self.MIN_STEPS and sec > 0 else None

    def mode(self, batch: int | tuple[int, ...]) -> bool:
        """The mode to run this step of size `batch` in."""
        b = self.bucket(batch)
        on, off = self.rate(b, True), self.rate(b, False)
        if on is None or off is None:  # measure mode True first, then False
            return on is None
        best = on >= off
        if self.best.get(b, best) != best:
            self.interval[b] = self.FIRST_INTERVAL  # the preference flipped: look again soon
        self.best[b] = best
        t = self.clock[b] = self.clock.get(b, 0) + 1
        interval = self.interval.setdefault(b, self.FIRST_INTERVAL)
        if t <= interval:
            return best
        if t > interval + self.EXPLORE_STEPS:
            self.clock[b] = 0
            self.interval[b] = min(2 * interval, self.MAX_INTERVAL)
            return best
        return not best

    def record(self, batch: int | tuple[int, ...], mode: bool, tokens: int, seconds: float) -> None:
        m = self.stats.setdefault(self.bucket(batch), {}).setdefault(mode, [0.0, 0.0, 0])
        m[0], m[1], m[2] = self.DECAY * m[0] + tokens, self.DECAY * m[1] + seconds, m[2] + 1


class DraftGuard(TimingGuard):
    """Whether drafting pays at all, measured: per batch-size bucket, the decayed tokens per second of
    pure-decode steps run with the adaptive drafting policy (mode True) and without drafting (False).

    The cost model above prices drafts from offline measurements; on another machine, another batch mix or a
    compiled step it can let through rounds that cost more than they save (at 16 code requests a round cost a
    third of a plain step for ~0.2 tokens). The guard times what actually happens and keeps the faster mode
    (TimingGuard). A pure-decode step counts whole if its round (at its end) and the round before it ran the
    same mode; of a step with prefill only its round counts, with no tokens (the first round after a prefill
    re-extends a window: a cost of drafting every request pays). A switch's step is left out: it verifies the
    other mode's drafts (counting it credited plain decoding with their tokens), and its round's catch-up
    after a pause is a cost of exploring, not of drafting (counting it made the guard pick plain decoding on
    batch-1 code, 1.05x against 1.31x with three drafts every step). Only requests whose drafting may depend
    on timing follow it (not seeded sampled ones: their tokens must not)."""

    # Below this batch it showed no gain (batch-1 code, default over MTP off: 1.03-1.15x with it in four
    # benchmark runs, 1.14x without it in a fifth, all on one noisy machine) and its explorations of plain
    # decoding cost most there. At 16 requests, interleaved A/B against the policy alone, over MTP off: code
    # 0.99x against 1.01x, chat tasks 0.91x against 0.86x. From 4 (was 8; the probe interval of 16 moved with
    # it), in-process A/B over 8, two runs of 6 rounds: 4 chat-task requests 1.152x and 1.146x (6 of 6 each),
    # 4 code requests 1.030x and 1.075x.
    MIN_BATCH = 4


def draft_floor(batch: int) -> float:
    """Cost of one more draft (its verify row and its head's block) in plain decode steps, at `batch`
    drafting sequences. Measured on the default model (CPU, 1 thread): at batch 1 the first draft costs 0.58
    plain steps (the round's own cost, ROUND_SHARE of a draft, included), each further one 0.4: a verify row
    makes the MoE layers read the weights of more experts, a head's block is about a layer and a half. As the
    verify rows of a large batch turn into real compute the cost rises (measured 0.4 per draft at batch 4,
    0.65 at 16 and 64 on code prompts)."""
    return 0.42 + 0.4 * batch / (batch + 12)


def default_draft_vocab_size(vocab_size: int) -> int:
    """A quarter of the vocabulary, at least 1024 ids (all of them for small vocabularies)."""
    return vocab_size if vocab_size <= 1024 else max(1024, vocab_size // 4)


@dataclass
class MTPState:
    """Per-sequence drafting state: recent main hidden states, each block's first non-final position, and
    the acceptance calibration of adaptive drafting."""

    h: torch.Tensor | None = None  # [L, D] hidden states of positions [h_start, h_start + L)
    h_start: int = 0
    valid: list[int] = field(default_factory=list)  # per block: entries at positions < valid[k] are final
    kv_lo: int = 0  # first position the MTP blocks ever computed (the same for all blocks)
    drafts: list[int] = field(default_factory=list)  # drafts for the next verify step
    probs: list[float] = field(default_factory=list)  # each draft's probability under its head
    ests: list[float] = field(default_factory=list)  # each draft's acceptance estimate, given the ones before
    hits: float = 0.0  # decayed count of this request's accepted drafts
    expect: float = 0.0  # decayed sum of the estimates of the drafts verification examined
    # decayed acceptance estimate of the draft of each block (from PRIOR_RATE): whether running it pays
    mean_a: list[float] = field(default_factory=list)
    seen: tuple[int, int, int] | None = None  # the sequence's (verify steps, drafted, accepted) folded in
    dry: int = 0  # steps in a row that proposed no draft (skipped rounds, or a first draft below the rule)
    probe_every: int = PROBE_EVERY[0]  # set each round from the batch (PROBE_EVERY)
    left: int | None = None  # tokens the request may still make (None: no max_tokens), set each round
    # chains computed by greedy rounds whose outcome is not known yet: (position of the first draft, the drafts,
    # their head probabilities, the first draft not resolved)
    made: list[tuple[int, list[int], list[float], int]] = field(default_factory=list)

    def append(self, start: int, rows: torch.Tensor, keep_from: int) -> None:
        """Add hidden rows of positions [start, start + len(rows)), dropping rows before keep_from."""
        if self.h is None or start != self.h_start + self.h.shape[0]:
            self.h, self.h_start = rows, start
        else:
            self.h = torch.cat([self.h, rows])
        if keep_from > self.h_start:
            cut = min(keep_from - self.h_start, self.h.shape[0])
            self.h, self.h_start = self.h[cut:], self.h_start + cut

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.h[lo - self.h_start:hi - self.h_start]

    @property
    def factor(self) -> float:
        """How this request's drafts fare against the estimates (1 until it has some history)."""
        return (self.hits + PRIOR) / (self.expect + PRIOR)

    def observe(self, seq: Sequence) -> list[tuple[int, float, bool]]:
        """Fold the outcome of the verify step of the last drafts into the request's factor; returns the drafts
        of earlier rounds whose outcome is now known (head, head probability, accepted), for the calibration."""
        now = (seq.num_verify_steps, seq.num_draft_tokens, seq.num_accepted_tokens)
        seen, self.seen = self.seen, now
        if seen is not None and now[0] != seen[0] and self.probs:
            verified, accepted = now[1] - seen[1], now[2] - seen[2]
            m = min(accepted + 1, verified, len(self.probs))  # drafts proposed by someone else carry no estimate
            self.hits = DECAY * self.hits + min(accepted, m)
            self.expect = DECAY * self.expect + sum(self.ests[:m])
        return self.resolve(seq)

    def resolve(self, seq: Sequence) -> list[tuple[int, float, bool]]:
        """Greedy acceptance is agreement with the model's own next tokens, so every draft a round computed has
        an outcome once its position is committed, proposed or not: draft j of a chain counts if drafts 0..j-1
        matched, as verification would have examined it. Counting only proposed drafts biased the calibration:
        a bucket whose drafts were cut was examined only by probes, after dry spells, and its estimate sank
        (code, head 0, probability below 0.1: estimated 0.34-0.46, accepted 0.61 when proposed every step).
        E.g. a chain made at n = 10 (drafts for positions 11, 12, 13), one draft proposed and accepted and the
        bonus committed: positions 11 and 12 are known and the third draft waits for the next round."""
        out, left = [], []
        end = seq.num_tokens
        for first, toks, probs, j in self.made:
            while j < len(toks) and first + j < end:
                ok = seq.token_ids_slice(first + j, first + j + 1)[0] == toks[j]
                out.append((j, probs[j], ok))
                j = j + 1 if ok else len(toks)
            if j < len(toks):
                left.append((first, toks, probs, j))
        self.made = left
        return out

    @property
    def probe_due(self) -> bool:
        """No draft was verified for `probe_every` steps: propose the first one whatever its estimate, or a
        low estimate would never be tested again (nothing verified, nothing learnt). Not in a request's last
        `probe_every` tokens: what a probe learns pays only over the tokens after it (traced on 16-token chat
        tasks: the second probe came with 2 tokens left)."""
        return self.dry >= self.probe_every and (self.left is None or self.left > self.probe_every)

    def wants_round(self, pays: bool) -> bool:
        """Whether to draft this step: the expected chain pays for its cost (`pays`), or a probe is due."""
        if pays or self.probe_due:
            return True
        self.dry += 1
        return False


class ModelRunner:
    def __init__(self, model, cache: KVCache, device: torch.device | str = "cpu",
                 draft_vocab_size: int | None = None, compile: bool = False):
        self.model = model
        # compiled: steps whose segments are all short (decode, verify, drafting) run as torch.compile graphs
        # with dynamic shapes; prefill chunks and steps that record routing stay eager (module docstring)
        self.compiled = compile
        self._hidden = _compiled(model.forward_hidden) if compile else None
        self._mtp_hidden = _compiled(model.mtp_hidden) if compile else None
        self.cache = cache
        self.device = torch.device(device)
        self.window = model.config.sliding_window
        V = model.config.vocab_size
        n = default_draft_vocab_size(V) if draft_vocab_size is None else draft_vocab_size
        if not isinstance(n, int) or not 1 <= n <= V:
            raise ValueError(f"draft_vocab_size must be an integer in [1, {V}], got {n!r}")
        ids = list(range(n))
        eos = model.config.eos_token_id
        if eos is not None and eos >= n:
            ids.append(eos)  # the end of a request is worth drafting whatever its id
        # None: the full head, the reference the reduced one is tested against
        self.draft_ids = None if n == V else torch.tensor(ids, device=self.device)
        self._head: tuple[int, torch.Tensor] | None = None  # (weights version, lm_head rows of draft_ids)
        # per head and head-probability bucket: decayed (accepted, examined) drafts over all requests, from an
        # optimistic prior; the heads' probabilities are not acceptance rates (distilled heads are
        # underconfident: probability-0.2 drafts were accepted 9 times in 10 on code, 4 in 10 on chat tasks)
        self.calib = [[[PRIOR_RATE * BUCKET_PRIOR, BUCKET_PRIOR] for _ in range(len(BUCKETS) + 1)]
                      for _ in range(model.n_mtp)]

    def forward(self, items: list[tuple[Sequence, int, list[int]]], routing=None) -> torch.Tensor:
        """items: (seq, start position, query token ids). Returns pre-norm hidden states [N, D]; `routing`
        (mimo.model.moe.Routing) records the chosen experts of the N flattened rows."""
        segs, ids, pos = [], [], []
        for seq, start, toks in items:
            segs.append(Segment(start, len(toks), seq.full_block_table, seq.sliding_block_table))
            ids += toks
            pos += range(start, start + len(toks))
        input_ids = long_tensor(ids, self.device)[None]
        positions = long_tensor(pos, self.device)[None]
        view = self.cache.view(segs)
        if self._hidden is not None and routing is None and not view.long:
            return self._hidden(input_ids, positions, view)[0]
        return self.model.forward_hidden(input_ids, positions, view, routing)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    def draft_head(self) -> torch.Tensor:
        """lm_head rows of the draft vocabulary, transposed [D, draft vocab] (x @ it is faster than F.linear
        on the CPU: model/layers.LinearWeights), re-sliced when the model's weights change."""
        w = self.model.lm_head.weight
        if self.draft_ids is None:
            return w.t()
        version = self.model.weights_version
        if self._head is None or self._head[0] != version:
            self._head = (version, w[self.draft_ids].t().contiguous())
        return self._head[1]

    def draft(self, seqs: list[Sequence], states: list[MTPState], num_drafts: list[int],
              floors: list[float] | None = None, private: list[bool] | None = None) -> None:
        """One drafting round: fills states[i].drafts (and .probs) with up to num_drafts[i] greedy MTP drafts.

        floors[i] (default None: always num_drafts[i] drafts) turns on adaptive drafting (module docstring):
        the sequence's last verify outcome is folded into its calibration, it skips the round while its
        expected first draft is below floors[i], and its chain ends at the first draft whose chain estimate is
        below floors[i], that draft dropped. private[i]: decide from the sequence's own history only (a
        seeded sampled request: how many drafts it verifies decides which random draws make its tokens, so
        that must not depend on other requests): its costs assume a batch of SEEDED_BATCH, whatever the batch.

        Block k of a sequence runs over [lo_k, n), lo_k = max(its first non-final entry, n - W). Blocks that
        ran last round are a few positions behind and share the oldest of their lo's, so one step view serves
        them (re-running a final entry rewrites the same K/V); a block that skipped rounds catches up alone.
        """
        W, n_mtp = self.window, self.model.n_mtp
        n_of = [seq.num_computed_tokens for seq in seqs]
        own = private if private is not None else [False] * len(seqs)
        for st in states:
            if not st.mean_a:  # the blocks run in a request's first rounds and get measured
                st.mean_a = [PRIOR_RATE] * n_mtp
        # step cost in plain decode steps: 1, plus the round's fixed cost (shared by the batch; a private
        # sequence assumes SEEDED_BATCH, as its floor does) once anything is drafted, plus floors[i] per draft
        round_cost = [ROUND_SHARE * f / (SEEDED_BATCH if p else len(seqs))
                      for f, p in zip(floors or [0.0] * len(seqs), own)]

        def spent(i: int, k: int) -> float:  # cost with k drafts
            return 1.0 + (round_cost[i] + floors[i] * k if k else 0.0)

        def more(i: int, k: int, chain_k: float, gain_k: float, ests: list[float]) -> int:
            """How many drafts to add to k drafts (chain estimate chain_k, expected tokens gain_k) that maximises
            the expected tokens per unit of step cost, the next ones estimated `ests`; ties take more."""
            best, best_m, g = gain_k / spent(i, k), 0, gain_k
            for m, a in enumerate(ests, 1):
                chain_k *= a
                g += chain_k
                if g / spent(i, k + m) >= best:
                    best, best_m = g / spent(i, k + m), m
            return best_m

        if floors is not None:
            num_drafts = list(num_drafts)
            for i, (seq, st) in enumerate(zip(seqs, states)):
                # the buckets calibrate greedy acceptance (argmax agreement): only greedy rounds record chains
                for j, c, ok in st.observe(seq):
                    h = self.calib[j][bisect.bisect(BUCKETS, c)]
                    h[0], h[1] = HEAD_DECAY * h[0] + ok, HEAD_DECAY * h[1] + 1
                st.probe_every = PROBE_EVERY[(SEEDED_BATCH if own[i] else len(seqs)) >= DraftGuard.MIN_BATCH]
                mt = seq.sampling_params.max_tokens
                st.left = None if mt is None else mt - seq.num_output_tokens
                if not st.wants_round(more(i, 0, 1.0, 1.0, st.mean_a[:num_drafts[i]]) > 0):
                    num_drafts[i] = 0
        los: list[list[int]] = []  # per sequence, per block
        for st, n, nd in zip(states, n_of, num_drafts):
            if not st.valid:  # first round after (re)admission: only the last window matters
                st.valid = [max(0, n - W)] * n_mtp
                st.kv_lo = max(0, n - W)
            lo = [max(v, n - W) for v in st.valid]
            near = n - 2 * n_mtp - 2  # how far behind a block that ran last round can be
            shared = min((x for x in lo[:nd] if x >= near), default=n)
            los.append([shared if x >= near else x for x in lo])
            st.drafts, st.probs, st.ests = [], [], []
        head = self.draft_head()
        made: list[tuple[list[int], list[float]]] = [([], []) for _ in seqs]  # every draft computed, cut or not
        chain = [1.0] * len(seqs)  # estimate that every draft so far is accepted
        gain = [1.0] * len(seqs)  # expected tokens of the verify step with the drafts so far
        live = [i for i, nd in enumerate(num_drafts) if nd > 0]
        views: dict[tuple[tuple[int, int], ...], object] = {}
        for k in range(max(num_drafts, default=0)):
            live = [i for i in live if num_drafts[i] > k]
            if floors is not None and k > 0:  # run block k only if the chain is expected to pay with it (rule below)
                run = [i for i in live
                       if more(i, k, chain[i], gain[i], states[i].mean_a[k:num_drafts[i]]) > 0]
                for i in set(live) - set(run):  # an estimate a block never runs to refresh drifts back up
                    states[i].mean_a[k] += RETRY * (1.0 - states[i].mean_a[k])
                live = run
            if not live:
                break
            key = tuple((i, los[i][k]) for i in live)
            if key not in views:
                # keys below n - W are never read: the last row's window starts there (module docstring)
                views[key] = self.cache.view([
                    Segment(lo, n_of[i] - lo, seqs[i].full_block_table, seqs[i].sliding_block_table,
                            max(states[i].kv_lo, n_of[i] - W)) for i, lo in key])
            ids, pos, hid, lengths = [], [], [], []
            for i, lo in key:
                seq, st, n = seqs[i], states[i], n_of[i]
                # tokens x_{t+k+1} for t in [lo, n): committed up to x_n, then this round's drafts
                toks = seq.token_ids_slice(lo + k + 1, n + 1) if lo + k + 1 <= n else []
                toks = (toks + st.drafts[max(0, lo + k - n):])[: n - lo]
                ids += toks
                pos += range(lo, n)
                hid.append(st.rows(lo, n))
                lengths.append(n - lo)
                st.valid[k] = n - k
            hidden = hid[0] if len(hid) == 1 else torch.cat(hid)
            view = views[key]
            # a first round after prefill re-extends a whole window: eager
            block = self._mtp_hidden if self._mtp_hidden is not None and not view.long else self.model.mtp_hidden
            u = block(k, hidden[None], long_tensor(ids, self.device)[None], long_tensor(pos, self.device)[None],
                      view)[0]
            last = list(itertools.accumulate(lengths))  # each live sequence's row for its last position, + 1
            rows = u[-1:] if len(last) == 1 else u[torch.tensor(last, device=u.device) - 1]
            # head probability of the draft at the request's temperature (1 for greedy rows: same argmax)
            temps = [t if t >= GREEDY_EPS else 1.0 for t in (seqs[i].sampling_params.temperature for i in live)]
            logits = (rows @ head).float()
            if any(t != 1.0 for t in temps):  # two ops a block fewer when every row is greedy
                logits = logits / torch.tensor([[t] for t in temps], device=rows.device)
            prob, arg = torch.softmax(logits, dim=-1).max(-1)
            tok = arg if self.draft_ids is None else self.draft_ids[arg]
            stopped = set()
            rate = [hits / n for hits, n in self.calib[k]]
            for i, t, c in zip(live, tok.tolist(), prob.tolist()):
                st = states[i]
                # acceptance estimate of this draft, given the drafts before it: a sampled request accepts
                # an argmax draft with its target probability, which the (distilled) head's probability at
                # that temperature estimates; greedy acceptance is argmax agreement, calibrated per bucket
                if seqs[i].sampling_params.is_greedy:
                    a = min(1.0, rate[bisect.bisect(BUCKETS, c)] * st.factor)
                else:
                    a = min(1.0, c * st.factor)
                st.mean_a[k] = FIRST_DECAY * st.mean_a[k] + (1 - FIRST_DECAY) * a
                # the rule with lookahead: the draft stays in the chain if some chain through it, the later
                # blocks at their expected estimates, has more expected tokens per unit of step cost than the
                # chain without it. One draft at a time is myopic: at batch 1 (draft 0.45, round 0.16 steps)
                # estimates 0.6, 0.9, 0.9 give 1.60 / 1.61 = 0.99 with one draft, but 2.63 / 2.51 = 1.05 with
                # three (code prompts accepting 2.3 drafts a step with three, 1.36x, drafted in 1 step of 10)
                if floors is not None and seqs[i].sampling_params.is_greedy:
                    made[i][0].append(int(t))
                    made[i][1].append(c)
                forced = k == 0 and st.probe_due
                if (floors is not None and not forced
                        and more(i, k, chain[i], gain[i], [a] + st.mean_a[k + 1:num_drafts[i]]) == 0):
                    stopped.add(i)
                    continue
                chain[i] *= a
                gain[i] += chain[i]
                st.drafts.append(int(t))
                st.probs.append(c)
                st.ests.append(a)
            live = [i for i in live if i not in stopped]
        if floors is not None:
            for i, nd in enumerate(num_drafts):
                st = states[i]
                # the chain's actual estimates may end below what the lookahead hoped: keep its best prefix
                # (a forced probe keeps its first draft)
                m = max(more(i, 0, 1.0, 1.0, st.ests), min(1, len(st.drafts)) if st.probe_due else 0)
                st.drafts, st.probs, st.ests = st.drafts[:m], st.probs[:m], st.ests[:m]
                if nd > 0:  # skipped rounds counted in wants_round
                    st.dry = 0 if st.drafts else st.dry + 1
                if made[i][0]:  # d_1 is for position n + 1
                    st.made.append((n_of[i] + 1, *made[i], 0))
