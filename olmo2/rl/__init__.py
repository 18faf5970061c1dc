"""Reinforcement learning with verifiable rewards (RLVR), OLMo 2-Instruct's last stage.

``olmo2.rl.verifiers``: the programs that check answers and the rewards they pay.
``olmo2.rl.grpo``: group advantages and the clipped policy-ratio loss on fused token log-probs.
``olmo2.rl.data``: prompt JSONL with verifier and reference; evaluation prompt sets.
``olmo2.rl.evaluation``: verified accuracy on held-out prompts (RL, SFT and DPO evaluate with it).
``olmo2.rl.trainer``: the GRPO loop behind ``olmo2-rl``; ``olmo2.rl.demo``: the CPU demo.
"""
