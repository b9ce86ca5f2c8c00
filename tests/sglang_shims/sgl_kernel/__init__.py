"""Import shim for `sgl_kernel` in SGLang's own CPU engine (test tier `sglang_cpu` only).

Why it exists: with `SGLANG_USE_CPU_ENGINE=1`, SGLang 0.5.21 imports these CPU kernels from
`sgl_kernel` at module level (memory pool, allocation, speculative decoding helpers), so its
server cannot even start without that package. The PyPI package (`sglang-kernel` / `sgl-kernel`)
is built for CUDA only: on a machine without a GPU, `import sgl_kernel` fails loading its
`common_ops` library (`libnvrtc.so.12` missing); SGLang's CPU kernels come from a source build
for Intel AMX CPUs, which these machines are not. None of the names below is called on the paths
the contract tests use (page size 1, no speculative decoding, no hierarchical cache, torch_native
attention): each is a function that raises if it ever is, so a test would fail loudly instead of
computing something else. `torch.ops.sgl_kernel.*` ops stay absent; SGLang only logs
"Ignore import error" for model files (Qwen3.5, ...) that need them.
"""

_NAMES = [
    "copy_all_layer_kv_cache_cpu",      # sglang/kernels/ops/kvcache/cache_move.py (HiCache moves)
    "assign_req_to_token_pool_cpu",     # sglang/srt/mem_cache/allocation.py (spec decode only)
    "build_tree_kernel_efficient_cpu",  # speculative decoding (EAGLE) helpers
    "verify_tree_greedy_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
]


def _missing(name):
    def kernel(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} was called, but only the test import shim "
                           f"(tests/sglang_shims/sgl_kernel) is installed")
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


for _name in _NAMES:
    globals()[_name] = _missing(_name)
