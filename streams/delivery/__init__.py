"""The worker's delivery path: each record taken from Kafka ends as one prediction or one dead
letter (infer, index, batcher, exactly-once, ledger, flow, retry, dead letters)."""
