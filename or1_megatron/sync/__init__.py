"""Weight sync: the trainer's TP/PP shards, resharded to HF tensors, pushed to the rollout engines.

plan.py         the PushPlan / PushReport that cross from the coordinator to the trainer ranks
buckets.py      packs the export stream (policy/export.py) into size-bounded flat buckets
transports.py   one sender class per transport (colocated, distributed, disk) behind one interface
sender.py       the trainer-rank side: which rank sends, the stream -> buckets -> transport loop
coordinator.py  the engine side: pause, begin, push, end, flush, continue; versions, timeouts,
                restart of an engine that fails mid-sync
verify.py       the probe batch: engine log-probs against the trainer's after a sync
"""
