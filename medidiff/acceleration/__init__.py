"""Acceleration and compression transforms for any method's model function.

Each transform attaches to :attr:`medidiff.methods.base.Method.model_fn` as diffusers ``ModelHook`` s
under its own name and is removed again without a trace::

    from medidiff.acceleration import DeepCache, applied
    with applied(method.model_fn, DeepCache(interval=3)):
        out = method(x)

- :class:`DeepCache`: reuse the deep UNet features between refresh steps (``deepcache``); uniform,
  the paper's non-uniform, or a profiled schedule (:func:`feature_changes`, :func:`profiled_refresh_steps`).
- :class:`FasterDiffusion`: propagate the encoder's features, decode several steps as one batch
  (``faster_diffusion``).
- :class:`DeltaDiT`: Delta-Cache of the rear blocks early and the front blocks late (``delta_dit``);
  :class:`SelectiveBlockCache`: Delta-Cache of chosen blocks (``selective_block_cache``), chosen by
  profiling (:func:`block_changes`, :func:`profiled_block_cache`); both on a DiT's transformer blocks.
- :class:`BottleneckSampling`: the middle steps at low resolution with shifted timesteps (``bottleneck_sampling``).
- :class:`PostTrainingQuantization`: Q-Diffusion-style fake quantization (``quantization``),
  calibrated on :func:`record_model_inputs` (inputs recorded across sampling timesteps).
- :class:`Int8Quantization`: real int8 kernels (oneDNN, x86 CPU) and a self-contained int8 file
  (``int8``), with TFMQ-DM's temporal feature cache; :class:`ShippedInt8`: the int8 model shipped beside
  a model's weights (``int8: {}``, made by ``python -m medidiff.acceleration.make_int8``).
- :class:`FloatWeightQuantization`: FP8 / FP4 weights with AdaRound learned rounding (simulated);
  :func:`layer_sensitivity` + :func:`mixed_bits`: MixDQ-style per-layer weight bits;
  :class:`GroupQuantization`: DGQ-style group-wise weights with outliers kept (simulated).
- :class:`CacheQuant`: DeepCache's schedule chosen with quantization by dynamic programming, with
  decoupled error correction; :class:`EfficientDM` (quantization-aware adapters) and :class:`QuEST`
  (selected layers) fine-tuned by distillation from the float model (all simulated).
- :class:`MagnitudePruning`: unstructured magnitude pruning (``pruning``).
- :class:`ChannelPruning`: structured pruning of residual blocks' inner channels, really smaller
  convolutions (``channel_pruning``).
- :func:`transforms_from_spec`: the ``accelerate:`` mapping of a pipeline stage.

See docs/acceleration.md for what each reuses, its measured trade-off and how it deviates from
its paper.
"""

from medidiff.acceleration.block_caching import (
    DeltaDiT,
    SelectiveBlockCache,
    block_changes,
    profiled_block_cache,
)
from medidiff.acceleration.bottleneck_sampling import BottleneckSampling
from medidiff.acceleration.cachequant import CacheQuant
from medidiff.acceleration.calibration import CalibrationSet, record_model_inputs
from medidiff.acceleration.channel_pruning import ChannelPruning
from medidiff.acceleration.deepcache import DeepCache
from medidiff.acceleration.distillation import EfficientDM, QuEST
from medidiff.acceleration.faster_diffusion import FasterDiffusion
from medidiff.acceleration.float_formats import FloatWeightQuantization
from medidiff.acceleration.group_quant import GroupQuantization
from medidiff.acceleration.int8 import Int8Quantization, ShippedInt8
from medidiff.acceleration.mixed_precision import layer_sensitivity, mixed_bits
from medidiff.acceleration.profiling import feature_changes, profiled_refresh_steps
from medidiff.acceleration.pruning import MagnitudePruning
from medidiff.acceleration.quantization import PostTrainingQuantization
from medidiff.acceleration.spec import transforms_from_spec
from medidiff.acceleration.transform import Transform, TransformError, applied

__all__ = ["BottleneckSampling", "CacheQuant", "CalibrationSet", "ChannelPruning", "DeepCache", "DeltaDiT", "EfficientDM", "FasterDiffusion", "FloatWeightQuantization",
           "GroupQuantization", "Int8Quantization", "MagnitudePruning", "PostTrainingQuantization", "QuEST", "SelectiveBlockCache", "ShippedInt8", "Transform", "TransformError", "applied", "block_changes",
           "feature_changes", "layer_sensitivity", "mixed_bits", "profiled_block_cache", "profiled_refresh_steps", "record_model_inputs",
           "transforms_from_spec"]
