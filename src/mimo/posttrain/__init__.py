"""Post-training: GRPO with the engine as the rollout worker (`mimo rl`).

rollout.py (engine rollouts -> ids, masks, processed log-probs, routed experts), rewards.py (the tasks'
verifiers, the prompt mixture), grpo.py (advantages, IS mask, loss), flops.py (ledger), loop.py (`RLConfig`,
`run(config)`). The engine and the trainer never import this package.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "RLConfig": "mimo.posttrain.loop",
    "RLConfigError": "mimo.posttrain.loop",
    "run": "mimo.posttrain.loop",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
