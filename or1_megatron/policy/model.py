"""Builds the Qwen2 policy as a Megatron-core GPTModel from a Hugging Face architecture.

Two layer implementations build the same model with the same checkpoint keys:
- "te": transformer-engine's spec (fused norm+linear, flash attention), used on GPUs with TE;
- "local": megatron's linear layers with this project's fused RMSNorm, SwiGLU, per-token rotary
  embeddings and a packed-sequence (varlen) attention (`fused_ops.py`): the TE-free fast path
  on GPUs, what runs on CPU (TE cannot be installed there), and the numerical reference.
The model's last pipeline stage returns final hidden states, not logits: log-probabilities and
entropy come from the fused kernel over the output weight, so no [tokens, vocab] logits exist.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from or1_megatron.config.schema import ModelConfig, ParallelConfig
from or1_megatron.convert.hf_config import Qwen2Arch, padded_vocab_size
from or1_megatron.policy.fused_ops import apply_rope, rms_norm, rope_cos_sin, swiglu
from or1_megatron.policy.megatron_fixes import apply_megatron_fixes
from or1_megatron.policy.packing import HostPackedSeqParams


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# model.recompute -> megatron's recompute options. Selective recomputes the norms and the MLP
# (most of a layer's activations, and most of its FLOPs: plan.step_time.recomputed_share);
# recomputing the core attention would save little: the varlen/flash attention already keeps
# only q, k, v, its output and the lse.
RECOMPUTE_ARGS: dict[str, dict] = {
    "none": {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def use_transformer_engine(model_cfg: ModelConfig, device: torch.device) -> bool:
    """TE's layer spec on a GPU rank with transformer-engine at bf16 (TE has no attention
    backend for packed 'thd' sequences in fp32); megatron's local spec otherwise."""
    if model_cfg.layer_spec == "local":
        return False
    has_te = device.type == "cuda" and _te_importable()
    if model_cfg.layer_spec == "te":
        if not has_te:
            raise RuntimeError(
                "model.layer_spec=te needs a CUDA GPU with transformer-engine installed; "
                "use model.layer_spec=local (or auto) on this machine")
        if model_cfg.dtype != "bf16":
            raise RuntimeError(
                f"model.layer_spec=te with model.dtype={model_cfg.dtype}: transformer-engine has "
                "no attention backend for packed sequences in fp32; use model.dtype=bf16 or "
                "model.layer_spec=local")
    return has_te and model_cfg.dtype == "bf16"


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(
    arch: Qwen2Arch, model_cfg: ModelConfig, parallel: ParallelConfig, initialize: bool = True,
    device: torch.device = torch.device("cpu"), use_te: bool = False,
) -> TransformerConfig:
    """Megatron TransformerConfig for a Qwen2 decoder (bias on q/k/v only, SwiGLU, RMSNorm, GQA)
    computing on `device`.

    `initialize=False` skips random initialisation, for models whose weights are loaded next.
    """
    dtype = DTYPES[model_cfg.dtype]
    on_gpu = device.type == "cuda"
    recompute = RECOMPUTE_ARGS[model_cfg.recompute]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
        perform_initialization=initialize,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # Fusions need CUDA kernels: megatron's own on any GPU; the RoPE and weight-gradient
        # accumulation fusions come from transformer-engine, so only with its spec.
        gradient_accumulation_fusion=use_te,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=use_te,
        persist_layer_norm=False,
        # Packed micro-batches differ in length: p2p exchanges shapes first.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        batch_p2p_sync=on_gpu,
        **recompute,
    )


class Qwen2RMSNorm(torch.nn.Module):
    """Qwen2's RMSNorm exactly as Hugging Face computes it (fp32 statistics, cast, then scale).

    Marks its weight `sequence_parallel` so megatron all-reduces its gradient over TP when
    sequence parallelism splits the tokens (torch's own norm wrapper refuses SP altogether).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        # Where megatron puts its own parameters: the CPU under use_cpu_initialization, else
        # the rank's GPU.
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.weight, self.eps)


class SwiGLUMLP(MLP):
    """Megatron's MLP (same linear layers, parameters and TP sharding) with the fused SwiGLU,
    which saves only the gate/up projection for backward."""

    # megatron's TransformerLayer logs "Unknown MLP type" for any MLP subclass (and then builds
    # it with the default tensor-parallel group, which is the policy's): drop that one line.
    @staticmethod
    def quiet_unknown_mlp_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise ValueError("SwiGLUMLP is a dense MLP: per_token_scale (MoE) is not supported")
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))


class PackedCoreAttention(MegatronModule):
    """Causal attention over packed sequences ('thd' layout) for the local, non-TE spec.

    Megatron's own DotProductAttention rejects packed sequences. Rotary embeddings are applied
    here, per token, from the ``(cos, sin)`` the model attached to the packed-sequence params
    (megatron's own packed RoPE copies the boundaries to the host in every layer); then each
    sequence attends causally within itself only. Memory grows linearly with sequence length
    (no [L, L] scores are kept): on a GPU one varlen flash-attention call over the whole pack,
    with GQA and no host sync; elsewhere SDPA per sequence in 4-D with GQA, which takes torch's
    flash kernel for CPUs (3-D inputs would fall back to the math kernel and save
    [heads, L, L] fp32 scores).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs transformer-engine attention (GPUs only)")
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention needs packed_seq_params with qkv_format='thd'")
        # query [t, heads, d]; key/value [t, groups, d]
        if packed_seq_params.rotary_cos_sin is None:
            raise ValueError("PackedCoreAttention needs the rotary (cos, sin) that PolicyGPTModel attaches")
        cos, sin = packed_seq_params.rotary_cos_sin
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        # torch's varlen flash kernel takes fp16/bf16 only: fp32 on a GPU goes per sequence.
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_attention_available():
            out = varlen_causal_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                          packed_seq_params.max_seqlen_q, self.softmax_scale)
        else:
            out = self._per_sequence(query, key, value, _host_bounds(packed_seq_params))
        return out.reshape(query.shape[0], -1)

    def _per_sequence(self, query, key, value, bounds: list[int]) -> torch.Tensor:
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                out[:, :, start:end] = F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True,
                    scale=self.softmax_scale, enable_gqa=self.heads != self.groups)
        return out[0].transpose(0, 1)  # [t, heads, d]


def _host_bounds(packed_seq_params) -> list[int]:
    """Sequence boundaries as Python ints: the packer's host copy when it made the params
    (no device sync), else read from `cu_seqlens_q`."""
    bounds = getattr(packed_seq_params, "host_bounds", None)
    return list(bounds) if bounds is not None else packed_seq_params.cu_seqlens_q.tolist()


@functools.lru_cache(maxsize=1)
def _varlen_attn() -> tuple[Any, frozenset[str]] | None:
    """torch's varlen flash attention and the names of its parameters (they changed between
    torch releases), looked up once; None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attention_available() -> bool:
    return _varlen_attn() is not None


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """torch's varlen flash attention, causal within each packed sequence, GQA without copies
    of K/V where this torch has it ([t, heads, d] in and out)."""
    varlen_attn, params = _varlen_attn()
    kwargs: dict = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    if "scale" not in params:
        kwargs.pop("scale")
        query = query * (scale * math.sqrt(query.shape[-1]))  # the kernel's default 1/sqrt(d)
    cu = cu_seqlens.to(torch.int32)
    # v is a view into the fused q/k/v projection (q and k are fresh from RoPE): flash kernels
    # take dense [t, heads, d] tensors.
    query, key, value = (t if t.is_contiguous() else t.contiguous() for t in (query, key, value))
    return varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


def layer_spec(config: TransformerConfig, use_te: bool, pp_rank: Optional[int] = None):
    """The transformer block spec for this rank's pipeline stage."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    norm = ModuleSpec(module=Qwen2RMSNorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    spec.submodules.mlp.module = SwiGLUMLP
    num_layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=Qwen2RMSNorm)


class PolicyGPTModel(GPTModel):
    """GPTModel whose last stage returns the final (normed) hidden states [t, 1, h].

    The policy turns them into log-probabilities with the fused kernel over `output_weight()`,
    never materialising logits. With the local spec it computes the rotary ``(cos, sin)`` of
    the packed batch's positions once per forward, for every layer's attention.
    """

    def __init__(self, *args, local_rope: tuple[int, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_rope = local_rope  # (head_dim, theta) when the layers apply RoPE themselves

    def forward(self, input_ids, position_ids, attention_mask, *args, packed_seq_params=None, **kwargs):
        if self.local_rope is not None:
            if not isinstance(packed_seq_params, HostPackedSeqParams):
                raise ValueError("the local layer spec runs on packed micro-batches (PackedMicroBatch)")
            head_dim, theta = self.local_rope
            packed_seq_params = replace(packed_seq_params, rotary_cos_sin=rope_cos_sin(
                position_ids, head_dim, theta, self.config.params_dtype))
        return super().forward(input_ids, position_ids, attention_mask, *args,
                               packed_seq_params=packed_seq_params, **kwargs)

    def _postprocess(self, hidden_states, *args, **kwargs):
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_policy_model(
    arch: Qwen2Arch,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool,
    post_process: bool,
    pp_rank: Optional[int] = None,
    initialize: bool = True,
    device: torch.device = torch.device("cpu"),
) -> PolicyGPTModel:
    """Build this rank's stage of the policy on `device` (random init unless `initialize=False`)."""
    apply_megatron_fixes()
    use_te = use_transformer_engine(model_cfg, device)
    config = transformer_config(arch, model_cfg, parallel, initialize, device, use_te)
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    layer_logger.addFilter(SwiGLUMLP.quiet_unknown_mlp_warning)
    model = PolicyGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te, pp_rank),
        vocab_size=padded_vocab_size(
            arch.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tensor_parallel
        ),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        # The local spec applies RoPE in its attention (PackedCoreAttention); TE's uses
        # megatron's fused packed RoPE.
        position_embedding_type="rope" if use_te else "none",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        local_rope=None if use_te else (arch.head_dim, float(arch.rope_theta)),
    )
    if device.type == "cuda":
        model.cuda(device)  # what megatron's own set-up does: any buffer made on the host moves
    return model
