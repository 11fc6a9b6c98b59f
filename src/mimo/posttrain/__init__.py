"""Post-training: GRPO (`mimo rl`) and multi-teacher on-policy distillation (`mimo mopd`) with the engine as
the rollout worker.

rollout.py (engine rollouts -> ids, masks, processed log-probs, routed experts), rewards.py (the tasks'
verifiers, the prompt mixture), grpo.py (advantages, IS mask, the policy-gradient loss), mopd.py (teachers,
the per-token MOPD advantage, `MOPDConfig`), flops.py (ledger), loop.py (`RLConfig`, `run(config)` for
either config). The engine and the trainer never import this package.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "MOPDConfig": "mimo.posttrain.mopd",
    "RLConfig": "mimo.posttrain.loop",
    "RLConfigError": "mimo.posttrain.loop",
    "run": "mimo.posttrain.loop",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
