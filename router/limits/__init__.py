"""Who may send how much, and when: ``profile`` (a key's limits, priority and weight from the keys
file), ``concurrency`` (the per-model slot queue with priority lanes, and each router process's
share of a model's capacity), ``quotas`` (rate, token and concurrency quotas shared by every
router through Redis).
"""
