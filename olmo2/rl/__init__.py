"""Reinforcement learning with verifiable rewards (RLVR), OLMo 2-Instruct's last stage.

``olmo2.rl.verifiers``: the programs that check answers and the rewards they pay.
"""
