"""Reward service: Ray actors each serving one reward model or LLM judge (``rewards.models``).

See group.py (the driver's handle) and worker.py (the actor). The rollout workers call the actors
through ``rollout_server.served_rewards``. vLLM and transformers models load only inside the actors.
"""

from reward_server.group import RewardGroup

__all__ = ["RewardGroup"]
