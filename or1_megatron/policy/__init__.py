"""The Megatron-core policy: model construction, parallel set-up, batching, the per-rank worker."""
import warnings

# Warnings that describe the expected set-up, not a problem, silenced before megatron is
# imported so a run's log shows what matters: on CPU there is no transformer-engine or apex
# (the GPU image has transformer-engine, not apex), megatron still calls torch.distributed's deprecated names, and the
# CPU patches' function mode is where torch reports megatron's reads of non-leaf `.grad`.
for _message in (r"(Transformer Engine and )?Apex (is|are) not installed",
                 r"full scope is deprecated",
                 r"The \.grad attribute of a Tensor that is not a leaf Tensor"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                        category=FutureWarning)
