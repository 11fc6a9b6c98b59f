"""Sampling: pure functions of logits; one code path shared with speculative verification.

- `probs_from_logits` is THE target distribution: temperature, then top-k, then top-p (vLLM's order, through
  the model package's `filter_logits`, the same definition the reference `generate` uses), softmax in
  float32. Greedy rows (temperature < 1e-5) become a point mass on the argmax. Verification feeds target
  logits through the same function, so speculative output is distributed exactly like plain sampling.
- Reproducibility: a seeded request owns a `torch.Generator` (`make_generator`) that only its own rows
  consume, so its tokens do not depend on what else is in the batch. Unseeded rows share `default_generator`
  (or torch's global RNG). Greedy rows consume no randomness.
- Logprobs: log-softmax of the *raw* logits (before temperature / top-k / top-p), as vLLM returns by default,
  for the chosen token plus its rank and the n most likely alternatives; `logprobs_mode="processed"` gives
  the log of the distribution actually sampled from instead (RL's importance ratio needs that one).
- `penalize_` applies min_tokens and the repetition / presence / frequency penalties to the logits before
  any of the above, per row, with the history that row conditions on (so verify rows see earlier drafts).
- Stop tokens, max_tokens and stop strings are not handled here (scheduler / detokenizer).

Shapes: N rows (tokens to sample, one per request, or k + 1 per request in verification), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from mimo.engine.config import GREEDY_EPS, SamplingParams
from mimo.model.transformer import draw, draws, filter_logits

_Param = float | int | None | torch.Tensor


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A request's private generator; None when unseeded (it then uses the shared one)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _per_row(x: _Param, n: int, default: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if x is None:
        x = default
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).expand(n) if x.dim() == 0 else x.to(device=device, dtype=dtype)
    return torch.full((n,), x, device=device, dtype=dtype)


def probs_from_logits(logits: torch.Tensor, temperature: _Param = 1.0, top_k: _Param = None,
                      top_p: _Param = None, min_p: _Param = None) -> torch.Tensor:
    """logits [N, V] (or [V]) -> probabilities [N, V] float32.

    temperature / top_k / top_p: scalars or per-row tensors [N]. top_k <= 0 or None = off; top_p >= 1 or
    None = off. top-k keeps the tokens tied with the k-th largest logit too. top-p keeps the smallest set of
    most likely tokens whose mass reaches top_p (the most likely token is always kept). Example, probs
    [0.5, 0.3, 0.2], top_p 0.7: the mass before each token is [0, 0.5, 0.8] -> keep the first two ->
    [0.625, 0.375, 0]. min_p (0 = off) then drops tokens whose
    probability is below min_p times the most likely one's: probs [0.5, 0.3, 0.2], min_p 0.5 -> [0.625, 0.375, 0].
    """
    squeeze = logits.dim() == 1
    x_NV = logits.float().reshape(-1, logits.shape[-1])
    N, V = x_NV.shape
    dev = x_NV.device
    t_N = _per_row(temperature, N, 1.0, dev, torch.float32)
    greedy_N = t_N < GREEDY_EPS
    x_NV = x_NV / torch.where(greedy_N, torch.ones_like(t_N), t_N)[:, None]
    x_NV = filter_logits(x_NV, top_k, top_p)
    probs_NV = torch.softmax(x_NV, dim=-1)
    m_N = _per_row(min_p, N, 0.0, dev, torch.float32)
    if bool((m_N > 0).any()):
        keep_NV = probs_NV >= m_N[:, None] * probs_NV.max(-1, keepdim=True).values
        probs_NV = torch.softmax(x_NV.masked_fill(~keep_NV, float("-inf")), dim=-1)
    if bool(greedy_N.any()):
        onehot_NV = torch.zeros_like(probs_NV).scatter_(-1, logits.float().reshape(N, V).argmax(-1, keepdim=True),
                                                         1.0)
        probs_NV = torch.where(greedy_N[:, None], onehot_NV, probs_NV)
    return probs_NV[0] if squeeze else probs_NV


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from a probability vector [V] using `generator` (or the global RNG).

    A generator lives on one device; the row is moved to it, so CPU generators work with CUDA logits.
    """
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return draw(probs, generator)


def uniform(generator: torch.Generator | None, device: torch.device) -> float:
    """One U[0, 1) draw from `generator` (on its own device), else from the global RNG on `device`."""
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else device))


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token under the raw logits
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), best first


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int], num_top: int
                     ) -> list[TokenLogprobs]:
    """Log-softmax of raw logits [N, V] at token_ids [N], with rank and the num_top best alternatives."""
    lp_NV = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    ids_N = torch.as_tensor(token_ids, device=lp_NV.device, dtype=torch.long).reshape(-1)
    chosen_N = lp_NV.gather(-1, ids_N[:, None])[:, 0]
    rank_N = (lp_NV > chosen_N[:, None]).sum(-1) + 1
    top_lp, top_id = lp_NV.topk(min(num_top, lp_NV.shape[-1]), dim=-1)
    rows = zip(ids_N.tolist(), chosen_N.tolist(), rank_N.tolist(), top_id.tolist(), top_lp.tolist())
    return [TokenLogprobs(t, lp, r, list(zip(ti, tl))) for t, lp, r, ti, tl in rows]


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where the request asked for none


def sampling_tensors(params: Sequence[SamplingParams], device: str | torch.device = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (temperature, top_k with 0 = off, top_p, min_p), each [N], from each row's SamplingParams."""
    t = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    k = torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device)
    p_ = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    m = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    return t, k, p_, m


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           default_generator: torch.Generator | None = None) -> SamplerOutput:
    """Sample one token per row of logits [N, V]; row i follows params[i] and draws from generators[i].

    Greedy rows take the argmax and draw nothing. Each sampled row draws exactly once from its own generator
    (a seeded request's) or from `default_generator` (unseeded requests), so a seeded request's tokens
    depend only on its seed and its logits.
    """
    N = logits.shape[0]
    if len(params) != N:
        raise ValueError(f"{len(params)} SamplingParams for {N} rows of logits")
    gens = list(generators) if generators is not None else [None] * N
    if len(gens) != N:
        raise ValueError(f"{len(gens)} generators for {N} rows of logits")
    if all(sp.is_greedy for sp in params):  # the point masses of probs_from_logits, without building them
        tokens = logits.argmax(-1).tolist()
    else:
        probs_NV = probs_from_logits(logits, *sampling_tensors(params, logits.device))
        tokens = probs_NV.argmax(-1).tolist()  # the point mass of greedy rows
        rows = [i for i, sp in enumerate(params) if not sp.is_greedy]
        picked = probs_NV if len(rows) == N else probs_NV[rows]
        for i, t in zip(rows, draws(picked, [gens[i] or default_generator for i in rows])):
            tokens[i] = t
    logprobs: list[TokenLogprobs | None] = [None] * N
    want = [i for i, sp in enumerate(params) if sp.logprobs is not None]
    if want:
        num_top = max(params[i].logprobs or 0 for i in want)
        rows = compute_logprobs(logprob_source(logits[want], [params[i] for i in want]),
                                [tokens[i] for i in want], num_top)
        for i, r in zip(want, rows):
            n = params[i].logprobs or 0
            logprobs[i] = TokenLogprobs(r.token_id, r.logprob, r.rank, r.top[:n])
    return SamplerOutput(tokens, logprobs)


def logprob_source(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Rows [N, V] whose log-softmax is each row's requested logprob distribution.

    "processed" rows become log(probs_from_logits(...)): log-softmax of log-probabilities is the identity, so
    `compute_logprobs` needs no second mode; tokens outside top-k / top-p (or off the greedy argmax) get -inf.
    """
    proc = [i for i, sp in enumerate(params) if sp.logprobs_mode == "processed"]
    if not proc:
        return logits
    out = logits.float().clone()
    out[proc] = torch.log(probs_from_logits(logits[proc], *sampling_tensors([params[i] for i in proc], logits.device)))
    return out


def penalize_(logits_RV: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
              output_ids: Sequence[int], drafts: Sequence[int], stop_ids: Collection[int]) -> torch.Tensor:
    """Apply min_tokens and the penalties of one request to its rows [R, V] in place.

    Row j predicts output token len(output_ids) + j and conditions on output_ids + drafts[:j] (a verify
    step's rows follow the drafts; a sampling prefill has R = 1 and no drafts). Example: 2 outputs so far,
    min_tokens 3, R = 3 -> only row 0 (the 3rd token) has its stop ids blocked.
    """
    R, V = logits_RV.shape
    n_out = len(output_ids)
    blocked = min(R, params.min_tokens - n_out)
    if blocked > 0 and stop_ids:
        logits_RV[:blocked, list(stop_ids)] = float("-inf")
    if not params.has_penalties:
        return logits_RV
    dev = logits_RV.device
    hist = torch.as_tensor(list(output_ids), dtype=torch.long, device=dev)
    counts_V = torch.bincount(hist, minlength=V).to(logits_RV.dtype)
    counts_RV = counts_V.expand(R, V).clone()
    if R > 1:
        # row j adds one count for each of drafts[:j]: a cumulative sum of one-hot draft rows, shifted by one
        d_RV = torch.zeros_like(counts_RV)
        d_RV[torch.arange(1, R, device=dev), torch.as_tensor(list(drafts[:R - 1]), device=dev)] = 1
        counts_RV += d_RV.cumsum(0)
    if params.repetition_penalty != 1.0:
        seen_RV = counts_RV > 0
        seen_RV[:, torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)] = True
        r = params.repetition_penalty
        logits_RV.copy_(torch.where(seen_RV, torch.where(logits_RV > 0, logits_RV / r, logits_RV * r), logits_RV))
    if params.frequency_penalty:
        logits_RV -= params.frequency_penalty * counts_RV
    if params.presence_penalty:
        logits_RV -= params.presence_penalty * (counts_RV > 0).to(logits_RV.dtype)
    return logits_RV
