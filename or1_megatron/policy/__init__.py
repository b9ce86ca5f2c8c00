"""The Megatron-core policy: model construction, parallel set-up, batching, the per-rank worker."""
