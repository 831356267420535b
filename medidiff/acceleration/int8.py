"""Real int8 inference on x86 CPUs (oneDNN's int8 convolution), stored as a self-contained int8 file.

Every k x k convolution (k > 1) except the model's first convolution runs on ``onednn::qconv_pointwise``
(the kernel behind PyTorch's x86 int8 path): its input is quantized per tensor to 8 bits with a range
calibrated as in Q-Diffusion (:class:`~medidiff.acceleration.quantization.PostTrainingQuantization`, inputs
recorded across the sampling timesteps), its weight per output channel to 7 bits (-64..63, symmetric range
search, stored as int8), and the kernel returns float directly (no output quantization). Why W7A8: without
AVX-512 VNNI the kernels add pairs of uint8 x int8 products in 16 bits; with 8-bit weights, 8-bit inputs
overflow there (PyTorch's x86 default, ``reduce_range``, gives up an input bit instead), while weights
below 64 in magnitude keep every pair within range (255 * 64 * 2 < 2**15). The per-channel weights lose
less to the seventh bit than per-tensor inputs do. The other Conv/Linear layers (1x1 convolutions and
attention, where int8 kernels measured slower than float on this CPU; ``conv_in``, which reads the
sampler's state) keep float kernels on 8-bit-stored weights. Every convolution works in channels-last
order (the order oneDNN computes in; sums of tensors in mixed orders are several times slower), and the
kernel's input is quantized in one pass by PyTorch's per-tensor quantizer (:func:`quantize_input`). With
``temporal_cache`` (TFMQ-DM, on by default where the model is a diffusers UNet with a time embedding) the
time-embedding path keeps float activations on its own int8 weights and its features are kept per
timestep (:mod:`medidiff.acceleration.temporal`). Other modules' own parameters (the scalar coupling weights of the
reversible U-Net) are stored in float32 and used in place of the model's.

The file (:meth:`Int8Quantization.save`) holds every parameter of the model: int8 weights with their
float32 steps, float32 biases and norm parameters, and the input ranges; applied from it
(:meth:`Int8Quantization.load`), the model's own weights are not used at all, only its architecture.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import scale_zero, signed_weight
from medidiff.acceleration.layers import LayerOverride, override_weight, weight_layers
from medidiff.acceleration.quantization import PostTrainingQuantization
from medidiff.acceleration.temporal import (
    TemporalFeatures,
    cache_time_path,
    has_time_embedding,
    time_path_layers,
)
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    read_transform_file,
    write_transform_file,
)
from medidiff.methods.base import ModelFunction
from medidiff.model_registry import file_sha256

METADATA_KEY = "medidiff_int8"
ACT_BITS = 8  # the kernels' inputs
KERNEL_WEIGHT_BITS = 7  # the kernels' weights: no 16-bit overflow on AVX2 (see the module docstring)
STORED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)  # layers computed from the file by int8's own code
QUANTIZATION_KEYS = ("weight_scale", "input_scale", "input_zero")  # per quantized layer, beside its parameters


def runs_int8(layer: nn.Module) -> bool:
    """Whether oneDNN's int8 kernel runs this layer: a plain k x k convolution, k > 1."""
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple))


def _check_kernels() -> None:
    try:
        torch.ops.onednn.qconv_pointwise  # noqa: B018 (looking the operator up is the check)
        quantize_input(torch.zeros(1, 1, 1, 1), 1.0, 0)  # the per-tensor quantizer (deprecated in PyTorch)
    except (AttributeError, RuntimeError):
        raise TransformError("int8 needs PyTorch's oneDNN int8 convolution and per-tensor quantizer (an x86 CPU "
                             "build of the pinned torch); simulate it with PostTrainingQuantization instead") from None
    if not torch.backends.mkldnn.is_available():
        raise TransformError("int8 needs PyTorch built with oneDNN (mkldnn); simulate it with PostTrainingQuantization")


def quantize_input(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """``x / scale + zero`` rounded and clipped to 0..255, as the plain channels-last uint8 tensor the kernel
    reads: PyTorch's vectorised per-tensor quantizer in one pass (5x faster than rounding and clipping in
    float, then converting), its quint8 storage viewed as uint8."""
    x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():  # quint8 tensors are deprecated in PyTorch; the kernel input is plain uint8
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        q = torch.quantize_per_tensor(x, scale, zero, torch.quint8)
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


class Int8Conv(LayerOverride):
    """A Conv2d on oneDNN's int8 kernel: 8-bit input (step, zero point), 7-bit weight, float output."""

    def __init__(self, layer: nn.Conv2d, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float, input_zero: int):
        super().__init__()
        self.scale, self.bias, self.input_scale, self.input_zero = scale, bias, input_scale, input_zero
        self.zeros = torch.zeros(len(scale), dtype=torch.int64)
        self.args = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        self.packed = torch.ops.onednn.qconv_prepack(weight, scale, input_scale, input_zero, *self.args, None)

    def new_forward(self, module, x):
        if x.ndim != 4:
            raise TransformError(f"int8 convolution expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        codes = quantize_input(x, self.input_scale, self.input_zero)
        return torch.ops.onednn.qconv_pointwise(codes, self.input_scale, self.input_zero, self.packed, self.scale,
                                                self.zeros, self.bias, *self.args, 1.0, 0, torch.float32, "none", [], "")


class StoredLayer(LayerOverride):
    """Runs a Conv2d / Linear / GroupNorm / LayerNorm with the stored ``weight`` and ``bias``."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def new_forward(self, module, x):
        if isinstance(module, nn.Conv2d):  # channels last, as the int8 kernels' outputs: no mixed-order sums
            return module._conv_forward(x.contiguous(memory_format=torch.channels_last), self.weight, self.bias)
        if isinstance(module, nn.Linear):
            return F.linear(x, self.weight, self.bias)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, self.weight, self.bias, module.eps)
        return F.layer_norm(x, module.normalized_shape, self.weight, self.bias, module.eps)


class StoredParameters(ModelHook):
    """Runs any other module's own forward with its direct parameters replaced by the stored ones (swapped
    in while the first of any concurrent calls runs, swapped back when the last one returns)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.params, self.own, self.running, self.lock = params, {}, 0, threading.Lock()

    def new_forward(self, module, *args, **kwargs):
        with self.lock:
            if self.running == 0:
                self.own = {k: module._parameters[k] for k in self.params}
                module._parameters.update(self.params)
            self.running += 1
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    module._parameters.update(self.own)


def stored_modules(model_fn: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns parameters, by name; refuses models the int8 file cannot hold."""
    owners = {name: m for name, m in model_fn.named_modules() if any(True for _ in m.parameters(recurse=False))}
    if any(True for _ in model_fn.buffers()):
        raise TransformError("int8 cannot store a model with buffers (e.g. batch-norm statistics)")
    if any(p.device.type != "cpu" for p in model_fn.parameters()):
        raise TransformError("int8 kernels run on the CPU; move the model to the CPU first")
    return owners


class Int8Quantization(Transform):
    """W7A8 on real int8 kernels, calibrated on ``calibration`` (see the module docstring).

    The first application quantizes and calibrates; :meth:`save` writes the result and :meth:`load`
    applies it without calibration data, to any model of the same architecture.
    """

    name = "int8"

    def __init__(self, calibration: CalibrationSet | None = None, temporal_cache: bool | None = None):
        self.calibration, self.temporal_cache = calibration, temporal_cache
        self.tensors: dict[str, torch.Tensor] = {}
        self.kinds: dict[str, str] = {}  # module name -> "int8" (kernel), "weight" (int8-stored), "float"
        self.source = "its first model"
        self.made_from: str | None = None  # sha256 of the float weights file it was made from, where known
        # the time-path features kept: they depend on the timestep and this transform's weights alone,
        # so they stay valid from one application (and image) to the next
        self.temporal = TemporalFeatures()

    def attach(self, model_fn: ModelFunction) -> None:
        owners = stored_modules(model_fn)
        time_path = time_path_layers(model_fn) if self.temporal_cache or (
            self.temporal_cache is None and has_time_embedding(model_fn)) else {}
        if not self.tensors:
            self.tensors, self.kinds = self._quantize(model_fn, owners)
        self._check(owners, dict(model_fn.named_parameters()))
        computes = {}
        for name, module in owners.items():
            hook = self._hook(name, module)
            if name in time_path:
                computes[name] = hook.new_forward
            elif isinstance(module, nn.Conv2d | nn.Linear):
                override_weight(module, hook, self.name)
            else:
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.name)
        if time_path:
            cache_time_path(model_fn, self.name, computes, self.temporal)

    def _hook(self, name: str, module: nn.Module) -> ModelHook:
        t, kind = self.tensors, self.kinds[name]
        if not isinstance(module, STORED):
            return StoredParameters({key: t[f"{name}.{key}"] for key, _ in module.named_parameters(recurse=False)})
        bias = t.get(f"{name}.bias")
        if kind == "int8":
            return Int8Conv(module, t[f"{name}.weight"], t[f"{name}.weight_scale"], bias,
                            float(t[f"{name}.input_scale"]), int(t[f"{name}.input_zero"]))
        weight = t.get(f"{name}.weight")
        if kind == "weight":
            weight = weight.float() * t[f"{name}.weight_scale"].reshape((-1,) + (1,) * (weight.ndim - 1))
        return StoredLayer(weight, bias)

    def _check(self, owners: dict[str, nn.Module], params: dict[str, torch.Tensor]) -> None:
        quantized = {name for name, kind in self.kinds.items() if kind != "float"}
        stored = {k: v for k, v in self.tensors.items()  # the parameters, without the quantized layers' steps
                  if not (k.rpartition(".")[0] in quantized and k.rpartition(".")[2] in QUANTIZATION_KEYS)}
        expected = {k: tuple(v.shape) for k, v in params.items()}
        if {k: tuple(v.shape) for k, v in stored.items()} != expected or set(self.kinds) != set(owners) or any(
                kind == "int8" and not runs_int8(owners[name]) for name, kind in self.kinds.items()):
            raise TransformError(f"int8 from {self.source} was made for another architecture than this model's; "
                                 "quantize this model anew")
        if "int8" in self.kinds.values():
            _check_kernels()

    @torch.no_grad()
    def _quantize(self, model_fn: ModelFunction, owners: dict[str, nn.Module]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # the first convolution (conv_in) reads the sampler's state and the condition: its float input keeps
        # the model's precision (quantized, it alone cost the reversible U-Net most of its int8 error)
        first = next((name for name, m in weight_layers(model_fn).items() if isinstance(m, nn.Conv2d)), None)
        kernel = {name for name, m in owners.items() if runs_int8(m) and name != first}
        if kernel and (self.calibration is None or not self.calibration.inputs):
            raise TransformError("int8 has no calibration inputs; record them with record_model_inputs")
        ptq = PostTrainingQuantization(self.calibration, 8, ACT_BITS, split_shortcut=False, head_stem_bits=None,
                                       symmetric_weights=True, quantized_input=lambda name, layer: name in kernel,
                                       layer_bits=dict.fromkeys(kernel, KERNEL_WEIGHT_BITS))
        layers = ptq.quantize_layers(model_fn) if any(isinstance(m, nn.Conv2d | nn.Linear) for m in owners.values()) \
            else {}
        tensors, kinds = {}, {}
        for name, module in owners.items():
            for key, p in module.named_parameters(recurse=False):
                tensors[f"{name}.{key}"] = p.detach().float().clone()
            kinds[name] = "float"
            if name not in layers:
                continue
            q = layers[name]
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = signed_weight(q.codes, q.weight_ranges, q.bits)
            kinds[name] = "weight"
            if name in kernel and q.act_ranges is not None:  # layers the model never ran keep a float input
                lo, hi = q.act_ranges[0, 0].clamp(max=0), q.act_ranges[0, 1].clamp(min=0)
                scale, zero = scale_zero(lo, hi, ACT_BITS)
                tensors[f"{name}.input_scale"], tensors[f"{name}.input_zero"] = scale.reshape(1), zero.reshape(1)
                kinds[name] = "int8"
        return tensors, kinds

    def save(self, path: str | Path, made_from: Path | None = None) -> Path:
        """Write the int8 model (after an application) as safetensors; returns the path. ``made_from``: the
        float weights file it was made from, whose sha256 :meth:`for_weights` checks."""
        if not self.tensors:
            raise TransformError("int8: nothing to save yet; apply it to the model first")
        meta = {"act_bits": ACT_BITS, "kinds": self.kinds} | (
            {"made_from_sha256": file_sha256(made_from)} if made_from else {})
        return write_transform_file(path, self.tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path, temporal_cache: bool | None = None) -> Int8Quantization:
        """An int8 model written by :meth:`save`, ready to apply without calibration."""
        meta, tensors = read_transform_file(path, METADATA_KEY, "medidiff int8 file", "Int8Quantization.save")
        if meta.get("act_bits") != ACT_BITS:
            raise TransformError(f"{path}: int8 file with {meta.get('act_bits')}-bit inputs, made by an older medidiff; "
                                 f"this one runs {ACT_BITS}-bit inputs: make the file again with "
                                 "Int8Quantization(calibration).save")
        transform = cls(None, temporal_cache)
        transform.tensors, transform.kinds, transform.source = tensors, meta["kinds"], str(path)
        transform.made_from = meta.get("made_from_sha256")
        return transform

    @classmethod
    def for_weights(cls, weights: Path) -> Int8Quantization:
        """The int8 model shipped beside the float ``weights`` (:func:`shipped_file`); refused when it is
        missing or was made from other weights (the float model was retrained since)."""
        path, remake = shipped_file(weights), f"python -m medidiff.acceleration.make_int8 {weights.with_suffix('')}"
        if not path.is_file():
            raise TransformError(f"no int8 model ships beside {weights} ({path.name}); make it with `{remake}`, "
                                 "or name a file: int8: {file: ...}")
        transform = cls.load(path)
        if transform.made_from != file_sha256(weights):
            raise TransformError(f"{path} was made from other weights than {weights} (retrained since?); "
                                 f"make it again with `{remake}`")
        return transform


def shipped_file(weights: Path) -> Path:
    """Where the int8 model made from ``<name>.safetensors`` ships: ``<name>.int8.safetensors`` beside it."""
    return weights.with_name(f"{weights.stem}.int8.safetensors")


class ShippedInt8(Transform):
    """int8 from the file shipped beside the weights of whichever model it is applied to
    (``accelerate: {int8: {}}``): :meth:`Int8Quantization.for_weights` of ``model_fn.weights_file``,
    read once per weights file."""

    name = Int8Quantization.name

    def __init__(self):
        self.loaded: dict[Path, Int8Quantization] = {}

    def prepare(self, weights: Path) -> Int8Quantization:
        """The int8 model for the float ``weights``, read (and checked) once: a stage calls this when it
        is built, so that a missing or stale file stops the pipeline before its first study."""
        if weights not in self.loaded:
            self.loaded[weights] = Int8Quantization.for_weights(weights)
        return self.loaded[weights]

    def attach(self, model_fn: ModelFunction) -> None:
        if model_fn.weights_file is None:
            raise TransformError("int8 without a file needs a model loaded from its weights file (from_pretrained); "
                                 "name an int8 file instead: int8: {file: ...}")
        self.prepare(model_fn.weights_file).attach(model_fn)
