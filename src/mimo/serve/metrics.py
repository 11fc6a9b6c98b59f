"""Prometheus metrics with vLLM's names under a `mimo:` prefix, on a registry of the app's own.

Per-request figures (TTFT, inter-token latency, TPOT, end-to-end, queue time, token counts, finish reasons)
are observed by the request handlers, which know the text-level outcome (a stop string ends a request as
"stop", and usage counts only the tokens kept); engine-wide figures (running / waiting, KV usage per pool,
speculative drafted / accepted / verify steps) are read from `LLM.stats()` when /metrics is scraped.
Mean acceptance length = 1 + accepted / verify steps (PromQL: rate over rate).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mimo.engine import LLM

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
            80.0)


class _EngineCollector:
    def __init__(self, llm: LLM, model_name: str):
        self.llm, self.model_name = llm, model_name

    def collect(self):
        s = self.llm.stats()
        u = self.llm.block_manager.usage()
        lab = ["model_name"]
        for name, doc, value in (("num_requests_running", "Requests in the running batch", s["running"]),
                                 ("num_requests_waiting", "Requests waiting to be scheduled", s["waiting"])):
            g = GaugeMetricFamily(f"mimo:{name}", doc, labels=lab)
            g.add_metric([self.model_name], value)
            yield g
        kv = GaugeMetricFamily("mimo:kv_cache_usage_perc", "KV blocks in use per pool (1 = full)",
                               labels=lab + ["pool"])
        kv.add_metric([self.model_name, "all"], u.fraction)
        for pool in ("full", "sliding"):
            total = getattr(u, f"{pool}_total", 0)
            kv.add_metric([self.model_name, pool], getattr(u, f"{pool}_used") / total if total else 0.0)
        yield kv
        for name, doc, key in (
                ("spec_decode_num_drafts", "Verify steps that checked at least one draft", "verify_steps"),
                ("spec_decode_num_draft_tokens", "Draft tokens proposed", "drafted_tokens"),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted", "accepted_tokens"),
                ("num_preemptions", "Preemptions by recompute", "preemptions")):
            c = CounterMetricFamily(f"mimo:{name}", doc, labels=lab)
            c.add_metric([self.model_name], s[key])
            yield c


class Metrics:
    def __init__(self, llm: LLM, model_name: str):
        disable_created_metrics()  # the *_created series only double the exposition
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.requests = Counter("mimo:request_success", "Finished requests by finish reason",
                                lab + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("mimo:prompt_tokens", "Prompt tokens processed", lab, registry=r)
        self.generation_tokens = Counter("mimo:generation_tokens", "Tokens returned to clients", lab, registry=r)
        self.ttft = Histogram("mimo:time_to_first_token_seconds", "Arrival to first token", lab, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("mimo:inter_token_latency_seconds", "Gap between successive token deliveries", lab,
                             buckets=_LATENCY, registry=r)
        self.tpot = Histogram("mimo:time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)", lab,
                              buckets=_LATENCY, registry=r)
        self.e2e = Histogram("mimo:e2e_request_latency_seconds", "Arrival to last token", lab, buckets=_LATENCY,
                             registry=r)
        self.queue = Histogram("mimo:request_queue_time_seconds", "Arrival to first scheduling", lab,
                               buckets=_LATENCY, registry=r)
        r.register(_EngineCollector(llm, model_name))

    def observe_request(self, *, arrival: float, first_token: float | None, finish: float, queue_time: float | None,
                        prompt_tokens: int, output_tokens: int, finish_reason: str, gaps: list[float]) -> None:
        m = self.model_name
        self.requests.labels(m, finish_reason).inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(output_tokens)
        self.e2e.labels(m).observe(finish - arrival)
        if queue_time is not None:
            self.queue.labels(m).observe(queue_time)
        if first_token is not None:
            self.ttft.labels(m).observe(first_token - arrival)
            if output_tokens > 1:
                self.tpot.labels(m).observe((finish - first_token) / (output_tokens - 1))
        for g in gaps:
            self.itl.labels(m).observe(g)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
