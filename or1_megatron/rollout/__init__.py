"""Rollout engines: the engine interface (SGLang's calls), the CPU engine, SGLang on GPUs, the router.

protocol.py       request/response schemas of SGLang's HTTP API (the subset used), validation
serialization.py  weight payloads: ForkingPickler + base64, allow-list decoder, buckets, /dev/shm care
weight_group.py   the gloo weight-update group for update_weights_from_distributed on CPU
cpu_engine.py     the CPU engine: transformers model, scheduler thread, batched KV-cached sampling
server.py         `or1 serve`: the CPU engine behind SGLang's HTTP endpoints
engine.py         RolloutEngine interface and HttpEngine, its client for both engine kinds
launcher.py       engine processes: start, readiness, kill, restart
sglang_adapter.py `python -m sglang.launch_server` command line and the torch/SGLang version pin
router.py         spreads requests over engines, restarts dead ones and re-sends their requests
"""
