"""Pretrained T5 weights in, Hugging Face T5 weights out.

Users start from weights they already have: a Hugging Face T5 directory, a t5x checkpoint
(e.g. gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000) or a checkpoint of
ours. `load_params` reads any of them into our parameter tree (the t5x names, see
shared/T5X_REFERENCE.md), and `export_hf` writes ours back out for `transformers`.

Every array is created with `jax.make_array_from_callback`, so each device reads only its own
slice and no parameter need exist whole in host memory:

* safetensors (`model.safetensors`, sharded or not): slices are read lazily with `get_slice`.
* t5x: each TensorStore (zarr) array is read slice by slice; small arrays sit in the msgpack.
* ours (orbax): orbax itself restores each device's slice.
* `pytorch_model.bin` is the exception: torch memory-maps zip-format files, so only the pages
  of a slice are read, but legacy (pre-zip) files are read whole into host memory.

The mapping to Hugging Face: Linear weights are [out, in] (ours [in, out]); the relative
position table is in block 0 of each stack as [buckets, heads] (ours [heads, buckets]). T5 1.1
is gated (`wi_0`, `wi_1`) with an untied, unscaled `lm_head`; original T5 has one `wi` and ties
`lm_head` to `shared`, scaling the decoder output by d_model**-0.5, which is exactly our
`logits_via_embedding`. transformers 5 always ties the weights in memory and records the scaling
as `scale_decoder_outputs`; a T5 1.1 file it wrote may therefore lack `lm_head.weight`, which
then means `shared.weight`.

Checkpoints are read in the unscanned layout (`encoder/layers_<i>/...`, what Hugging Face and
t5x write); a model with `scan_layers` gets each stack's layers stacked on its "layers" axis
(`stack_layers`). Our own checkpoints may hold either layout and load into either model;
`export_hf` writes unscanned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from dsbs_jax import checkpoints, t5x_checkpoints
from dsbs_jax.errors import UserError
from dsbs_jax.models.t5 import PARAM_SCAN_AXIS, SCANNED_LAYERS, T5Config, abstract_params

if TYPE_CHECKING:
    from dsbs_jax.partitioning import Partitioner

Index = tuple[slice, ...]
_MAX_NAMED = 3
_EMBEDDING = "token_embedder/embedding"
_LOGITS = "decoder/logits_dense/kernel"
_VOCAB_PARAMS = (_EMBEDDING, _LOGITS)

# Hugging Face files -------------------------------------------------------------------------
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_TORCH = "pytorch_model.bin"
_HF_WEIGHT_FILES = (
    HF_SAFETENSORS,
    HF_SAFETENSORS + ".index.json",
    HF_TORCH,
    HF_TORCH + ".index.json",
)
# Copies of other tensors that older transformers versions wrote out; never needed.
_HF_REDUNDANT = frozenset(
    {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
)
# HF `feed_forward_proj` -> our `mlp_activations`. Plain "gelu" is absent on purpose: HF means
# the exact (erf) GELU there, ours is the tanh approximation ("gelu_new").
_HF_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
    "relu": ("relu",),
}
_TO_HF_ACTIVATION = {v: k for k, v in _HF_ACTIVATIONS.items() if k != "gated-gelu_new"}
_HF_TOP_LEVEL = {
    _EMBEDDING: "shared.weight",
    _LOGITS: "lm_head.weight",
    "encoder/encoder_norm/scale": "encoder.final_layer_norm.weight",
    "decoder/decoder_norm/scale": "decoder.final_layer_norm.weight",
    "encoder/relpos_bias/rel_embedding": (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
    "decoder/relpos_bias/rel_embedding": (
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
}
# (stack, our module in a layer) -> (index of the HF sub-layer, HF module).
_HF_SUBLAYERS = {
    ("encoder", "pre_attention_layer_norm"): (0, "layer_norm"),
    ("encoder", "attention"): (0, "SelfAttention"),
    ("encoder", "pre_mlp_layer_norm"): (1, "layer_norm"),
    ("encoder", "mlp"): (1, "DenseReluDense"),
    ("decoder", "pre_self_attention_layer_norm"): (0, "layer_norm"),
    ("decoder", "self_attention"): (0, "SelfAttention"),
    ("decoder", "pre_cross_attention_layer_norm"): (1, "layer_norm"),
    ("decoder", "encoder_decoder_attention"): (1, "EncDecAttention"),
    ("decoder", "pre_mlp_layer_norm"): (2, "layer_norm"),
    ("decoder", "mlp"): (2, "DenseReluDense"),
}
_HF_PROJECTIONS = {"query": "q", "key": "k", "value": "v", "out": "o"}

# t5x's legacy checkpoints ------------------------------------------------------------------
T5X_MSGPACK = "checkpoint"

# Layer parameters, unscanned ('encoder/layers_3/mlp/wo/kernel') and scanned ('encoder/layers/...').
_LAYER_PARAM = re.compile(r"(encoder|decoder)/layers_(\d+)/(.+)")
_SCANNED_PARAM = re.compile(rf"(encoder|decoder)/{SCANNED_LAYERS}/(.+)")


class CheckpointImportError(UserError):
    """A checkpoint that cannot be read into the model; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint array in our layout, read a slice at a time."""

    name: str  # as the checkpoint calls it, for messages
    shape: tuple[int, ...]
    read: Callable[[Index], np.ndarray]


def _transposed(tensor: _Tensor) -> _Tensor:
    """The same array seen transposed (HF [out, in] -> our [in, out])."""
    return _Tensor(
        tensor.name, tensor.shape[::-1], lambda index: np.asarray(tensor.read(index[::-1])).T
    )


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hf_config_to_t5_config(hf_config: Mapping[str, Any], **overrides: Any) -> T5Config:
    """Our T5Config for a Hugging Face T5 `config.json`, with `overrides` (e.g. dtype) applied."""
    activation = hf_config.get("feed_forward_proj", "relu")
    if activation not in _HF_ACTIVATIONS:
        raise CheckpointImportError(
            f"feed_forward_proj {activation!r} has no equivalent here; "
            f"supported: {sorted(_HF_ACTIVATIONS)}"
        )
    # transformers 5 records the output scaling itself; older configs say it with tying.
    tied = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    settings = dict(
        vocab_size=hf_config["vocab_size"],
        emb_dim=hf_config["d_model"],
        num_heads=hf_config["num_heads"],
        head_dim=hf_config["d_kv"],
        num_encoder_layers=hf_config["num_layers"],
        num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
        mlp_dim=hf_config["d_ff"],
        mlp_activations=_HF_ACTIVATIONS[activation],
        logits_via_embedding=bool(tied),
        dropout_rate=hf_config.get("dropout_rate", 0.1),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
    )
    return T5Config(**{**settings, **overrides})


def t5_config_to_hf_config(config: T5Config) -> dict[str, Any]:
    """The Hugging Face `config.json` contents for our config (readable by transformers 4 and 5)."""
    activation = _TO_HF_ACTIVATION.get(tuple(config.mlp_activations))
    if activation is None:
        raise CheckpointImportError(
            f"mlp_activations {config.mlp_activations} have no Hugging Face T5 equivalent"
        )
    tied = config.logits_via_embedding
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "feed_forward_proj": activation,
        "tie_word_embeddings": tied,
        "scale_decoder_outputs": tied,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides: Any) -> T5Config:
    """Infers our T5Config from parameter shapes keyed 'encoder/layers_0/...'.

    Sizes, layer counts and head count (from the relative-position table) are exact. What
    weights cannot tell is guessed as T5 does it: gated weights mean T5 1.1's gated GELU, a
    single `wi` means ReLU, and the maximum relative distance is 128.
    """
    mlp = "encoder/layers_0/mlp"
    gated = f"{mlp}/wi_0/kernel" in shapes
    relpos = "encoder/relpos_bias/rel_embedding"
    query = "encoder/layers_0/attention/query/kernel"
    wi = f"{mlp}/wi_0/kernel" if gated else f"{mlp}/wi/kernel"
    absent = [name for name in (_EMBEDDING, relpos, query, wi) if name not in shapes]
    if absent:
        raise CheckpointImportError(f"cannot infer the model size: {_named('missing', absent)}")
    vocab_size, emb_dim = shapes[_EMBEDDING]
    num_heads, num_buckets = shapes[relpos]
    settings = dict(
        vocab_size=vocab_size,
        emb_dim=emb_dim,
        num_heads=num_heads,
        head_dim=shapes[query][1] // num_heads,
        num_encoder_layers=_count_layers(shapes, "encoder"),
        num_decoder_layers=_count_layers(shapes, "decoder"),
        mlp_dim=shapes[wi][1],
        mlp_activations=("gelu", "linear") if gated else ("relu",),
        logits_via_embedding=_LOGITS not in shapes,
        relative_attention_num_buckets=num_buckets,
    )
    return T5Config(**{**settings, **overrides})


def _count_layers(shapes: Mapping[str, Any], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layers_(\d+)/")
    return len({m.group(1) for name in shapes if (m := pattern.match(name))})


def checkpoint_format(path: str) -> str:
    """'hf', 't5x' or 'ours': what `path` holds (a MODEL_DIR counts as its latest step)."""
    return _resolve(path)[0]


def checkpoint_step(path: str) -> int | None:
    """The training step of the t5x or our checkpoint at `path` (a MODEL_DIR: its latest), as
    its `checkpoint_<step>` directory names it; None for Hugging Face and for other names."""
    kind, root = _resolve(path)
    return checkpoints.step_of(root) if kind != "hf" else None


def check_resumable(path: str, config: T5Config) -> None:
    """Raises a one-line `CheckpointImportError` when our run at `path` cannot resume as `config`.

    A train state restores only into the layer layout (scanned or not) it was saved in:
    optimizer states such as Adafactor's factored moments have no per-layer equivalent. The
    parameters themselves load into either layout (`load_params`).
    """
    kind, root = _resolve(path)
    if kind != "ours":
        return
    stored_scanned = is_scanned(_orbax_shapes(root))
    if stored_scanned != config.scan_layers:
        stored = "scanned" if stored_scanned else "unscanned"
        raise CheckpointImportError(
            f"{path} holds {stored} layers but the model has scan_layers={config.scan_layers}: "
            f"resume it with scan_layers={stored_scanned}, or start a new MODEL_DIR with "
            f"initial_checkpoint_path={path} (its parameters load into either layout, its "
            "optimizer state does not)"
        )


def checkpoint_config(path: str, **overrides: Any) -> T5Config:
    """The T5Config of the checkpoint at `path`: HF's config.json, else inferred from shapes."""
    kind, root = _resolve(path)
    if kind == "hf":
        return hf_config_to_t5_config(_read_json(root / HF_CONFIG), **overrides)
    if kind == "t5x":
        shapes = {p: t.shape for p, t in _t5x_tensors(root).items()}
    else:
        shapes = _unscanned_shapes(_orbax_shapes(root))
    return config_from_shapes(shapes, **overrides)


# ---------------------------------------------------------------------------------------------
# Our parameters: shapes and shardings
# ---------------------------------------------------------------------------------------------


def param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape, keyed by its '/'-joined path ('encoder/layers_0/...')."""
    return {
        path: tuple(leaf.shape)
        for path, leaf in traverse_util.flatten_dict(
            abstract_params(config, boxed=False), sep="/"
        ).items()
    }


def param_shardings(config: T5Config, partitioner: Partitioner) -> Any:
    """The NamedSharding tree of the model's parameters under `partitioner`'s rules."""
    with partitioner.activation_rules():
        specs = nn.get_partition_spec(abstract_params(config))
    return partitioner.logical_to_sharding(specs)


# ---------------------------------------------------------------------------------------------
# Scanned and unscanned layouts
# ---------------------------------------------------------------------------------------------


def stack_layers(flat: Mapping[str, Any], stack: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """Unscanned flat parameters ('/'-joined paths) -> scanned: `stack` joins a stack's layers.

    Leaves may be arrays, shapes, shardings or lazy tensors: `stack` gets one leaf per layer,
    in layer order, and makes the scanned leaf. Other parameters pass through unchanged.
    """
    layers: dict[str, dict[int, Any]] = {}
    out = {}
    for path, leaf in flat.items():
        match = _LAYER_PARAM.fullmatch(path)
        if match:
            scanned = f"{match[1]}/{SCANNED_LAYERS}/{match[3]}"
            layers.setdefault(scanned, {})[int(match[2])] = leaf
        else:
            out[path] = leaf
    for path, by_index in layers.items():
        out[path] = stack([by_index[i] for i in range(len(by_index))])
    return out


def unstack_layers(flat: Mapping[str, Any], unstack: Callable[[Any], list[Any]]) -> dict[str, Any]:
    """Scanned flat parameters -> unscanned: `unstack` splits a leaf into its layers' leaves."""
    out = {}
    for path, leaf in flat.items():
        match = _SCANNED_PARAM.fullmatch(path)
        if match:
            for index, part in enumerate(unstack(leaf)):
                out[f"{match[1]}/layers_{index}/{match[2]}"] = part
        else:
            out[path] = leaf
    return out


def is_scanned(paths: Any) -> bool:
    """Whether parameter paths are in the scanned layout."""
    return any(_SCANNED_PARAM.fullmatch(path) for path in paths)


def _stacked_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (*shapes[0][:PARAM_SCAN_AXIS], len(shapes), *shapes[0][PARAM_SCAN_AXIS:])


def _unstacked_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    layer = (*shape[:PARAM_SCAN_AXIS], *shape[PARAM_SCAN_AXIS + 1 :])
    return [layer] * shape[PARAM_SCAN_AXIS]


def _unscanned_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return unstack_layers(shapes, _unstacked_shapes)


def _stacked_sharding(shardings: list[NamedSharding]) -> NamedSharding:
    """A layer's sharding with the (replicated) "layers" axis inserted."""
    spec = tuple(shardings[0].spec)
    if len(spec) > PARAM_SCAN_AXIS:
        spec = (*spec[:PARAM_SCAN_AXIS], None, *spec[PARAM_SCAN_AXIS:])
    return NamedSharding(shardings[0].mesh, PartitionSpec(*spec))


def _unstacked_sharding(sharding: NamedSharding) -> NamedSharding:
    """A scanned parameter's sharding without its "layers" axis: one layer's."""
    spec = tuple(sharding.spec)
    if len(spec) > PARAM_SCAN_AXIS:
        spec = (*spec[:PARAM_SCAN_AXIS], *spec[PARAM_SCAN_AXIS + 1 :])
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


_Layout = tuple[tuple[int, ...], NamedSharding]  # a parameter's shape and sharding


def _stacked_layout(layers: list[_Layout]) -> _Layout:
    return _stacked_shape([shape for shape, _ in layers]), _stacked_sharding([layers[0][1]])


def _unstacked_layout(layout: _Layout) -> list[_Layout]:
    shape, sharding = layout
    return [(layer, _unstacked_sharding(sharding)) for layer in _unstacked_shapes(shape)]


def _stacked_tensor(layers: list[_Tensor]) -> _Tensor:
    """Per-layer checkpoint arrays seen as one scanned array; a slice reads only its layers."""
    first = layers[0]

    def read(index: Index) -> np.ndarray:
        layer_index = (*index[:PARAM_SCAN_AXIS], *index[PARAM_SCAN_AXIS + 1 :])
        parts = [layers[i].read(layer_index) for i in range(len(layers))[index[PARAM_SCAN_AXIS]]]
        return np.stack([np.asarray(part) for part in parts], axis=PARAM_SCAN_AXIS)

    return _Tensor(first.name, _stacked_shape([t.shape for t in layers]), read)


def _unscanned(config: T5Config) -> T5Config:
    return dataclasses.replace(config, scan_layers=False)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_params(path: str, config: T5Config, shardings: Any) -> dict[str, Any]:
    """Reads the pretrained T5 at `path` into our parameter tree, placed by `shardings`.

    `path` is a Hugging Face T5 directory, a t5x checkpoint directory (`gs://` works) or one of
    ours (scanned or not); a directory of `checkpoint_<step>` subdirectories means its latest
    step. Arrays are cast to `config.param_dtype` and stacked or unstacked to `config`'s layout.
    Raises `CheckpointImportError` naming every missing, unexpected or misshaped parameter (in
    the unscanned layout) and a vocabulary-size mismatch.
    """
    kind, root = _resolve(path)
    expected = param_shapes(config)
    placement = traverse_util.flatten_dict(shardings, sep="/")
    if placement.keys() != expected.keys():
        raise ValueError("`shardings` does not match the parameters of `config`")
    dtype = jnp.dtype(config.param_dtype)
    with contextlib.ExitStack() as stack:
        stored = _checked_tensors(path, kind, root, config, stack)
        if kind == "ours":
            return _restore_orbax_as(root, is_scanned(stored), config, placement, dtype)
        tensors = stack_layers(stored, _stacked_tensor) if config.scan_layers else stored
        arrays = {p: _place(tensors[p], expected[p], placement[p], dtype) for p in expected}
    return traverse_util.unflatten_dict(arrays, sep="/")


def check_params(path: str, config: T5Config) -> None:
    """Raises the `CheckpointImportError` that `load_params` would, reading shapes alone."""
    kind, root = _resolve(path)
    with contextlib.ExitStack() as stack:
        _checked_tensors(path, kind, root, config, stack)


def _checked_tensors(
    path: str, kind: str, root: epath.Path, config: T5Config, stack: contextlib.ExitStack
) -> dict[str, Any]:
    """The checkpoint's parameters, checked against `config` in the unscanned layout: our
    checkpoint's stored shapes (its own layout), or the foreign checkpoint's lazy tensors by our
    path (open while `stack` is)."""
    layer_shapes = param_shapes(_unscanned(config))
    if kind == "ours":
        stored = _orbax_shapes(root)
        _check(path, _unscanned_shapes(stored), layer_shapes, str, _never)
        return stored
    if kind == "hf":
        tensors = _hf_tensors(root, layer_shapes, config.logits_via_embedding, stack)
        naming, transposed = _hf_name, _hf_transposed
    else:
        tensors, naming, transposed = _t5x_tensors(root), str, _never

    def label(p: str) -> str:
        return tensors[p].name if p in tensors else naming(p)

    _check(path, {p: t.shape for p, t in tensors.items()}, layer_shapes, label, transposed)
    return tensors


def _place(tensor: _Tensor, shape: tuple[int, ...], sharding: Any, dtype: Any) -> jax.Array:
    """Builds one global array; replicas of the same slice are read once."""
    slices: dict[tuple, np.ndarray] = {}

    def read(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in slices:
            slices[key] = np.asarray(tensor.read(index), dtype)
        return slices[key]

    return jax.make_array_from_callback(shape, sharding, read)


def _never(path: str) -> bool:
    """Layouts that match ours: nothing is transposed."""
    return False


def _check(
    path: str,
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    label: Callable[[str], str],
    transposed: Callable[[str], bool],
) -> None:
    """Raises one CheckpointImportError listing everything that does not fit the model.

    Parameters are named by `label` and shapes shown in the checkpoint's own layout (reversed
    where `transposed`), so the message speaks the checkpoint's language.
    """

    def shape(p: str, dims: tuple[int, ...]) -> str:
        return _shape(dims[::-1] if transposed(p) else dims)

    problems = []
    vocab, want_vocab = found.get(_EMBEDDING, (None,))[0], expected[_EMBEDDING][0]
    vocab_differs = vocab is not None and vocab != want_vocab
    if vocab_differs:
        problems.append(
            f"vocabulary size {vocab} in the checkpoint but {want_vocab} in the model "
            "(set the model's vocab_size to the checkpoint's)"
        )
    missing = [label(p) for p in expected if p not in found]
    unexpected = [label(p) for p in found if p not in expected]
    misshaped = [
        f"{label(p)} {shape(p, found[p])} (model needs {shape(p, expected[p])})"
        for p in expected
        if p in found and found[p] != expected[p] and not (vocab_differs and p in _VOCAB_PARAMS)
    ]
    problems += [
        _named("missing", missing),
        _named("unexpected", unexpected),
        _named("wrong shape", misshaped),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointImportError(f"cannot load {path} into this T5: " + "; ".join(problems))


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _named(kind: str, names: list[str]) -> str:
    """'missing: a, b, c and 4 more' (empty when there are no names)."""
    if not names:
        return ""
    more = len(names) - _MAX_NAMED
    return f"{kind}: " + ", ".join(names[:_MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# Which format
# ---------------------------------------------------------------------------------------------


def _resolve(path: str) -> tuple[str, epath.Path]:
    """('hf' | 't5x' | 'ours', checkpoint dir); a MODEL_DIR resolves to its latest step."""
    root = epath.Path(path)
    if not root.is_dir():
        raise CheckpointImportError(
            f"no checkpoint directory at {path}: give a Hugging Face T5 directory, a t5x "
            "checkpoint or a MODEL_DIR that `python -m dsbs_jax.train` wrote"
        )
    kind = _kind(root)
    latest = None if kind else checkpoints.latest_step_dir(root)
    if latest is not None:
        root, kind = latest, _kind(latest)
    if kind is None:
        raise CheckpointImportError(
            f"{path} is not a checkpoint: expected a Hugging Face T5 directory "
            f"({HF_CONFIG} plus {' or '.join(_HF_WEIGHT_FILES)}), a t5x checkpoint "
            f"(a '{T5X_MSGPACK}' msgpack file) or one of ours "
            f"(a '{checkpoints.STATE_ITEM}' directory)"
        )
    return kind, root


def _kind(root: epath.Path) -> str | None:
    if (root / HF_CONFIG).exists() and any((root / f).exists() for f in _HF_WEIGHT_FILES):
        return "hf"
    if (root / T5X_MSGPACK).is_file():
        return "t5x"
    if (root / checkpoints.STATE_ITEM).is_dir():
        return "ours"
    return None


def _read_json(path: epath.Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def _hf_name(path: str) -> str:
    """Our parameter path -> its Hugging Face T5 tensor name."""
    if path in _HF_TOP_LEVEL:
        return _HF_TOP_LEVEL[path]
    stack, layer, module, *rest = path.split("/")
    index, hf_module = _HF_SUBLAYERS[stack, module]
    prefix = f"{stack}.block.{layer.removeprefix('layers_')}.layer.{index}.{hf_module}"
    if hf_module == "layer_norm":
        return f"{prefix}.weight"
    return f"{prefix}.{_HF_PROJECTIONS.get(rest[0], rest[0])}.weight"


def _hf_transposed(path: str) -> bool:
    """HF stores Linear weights [out, in] and the position table [buckets, heads]."""
    return path.endswith(("/kernel", "/rel_embedding"))


def _hf_tensors(
    root: epath.Path, expected: Mapping[str, Any], tied: bool, stack: contextlib.ExitStack
) -> dict[str, _Tensor]:
    """HF tensors keyed by our path; ones we have no place for stay under their HF name."""
    raw = _hf_raw_tensors(Path(root), stack)
    ours_by_hf = {_hf_name(p): p for p in expected}
    if not tied and "lm_head.weight" not in raw and "shared.weight" in raw:
        raw["lm_head.weight"] = raw["shared.weight"]  # tied yet unscaled (transformers 5)
    ignored = _HF_REDUNDANT | ({"lm_head.weight"} if tied else set())
    tensors = {}
    for name, tensor in raw.items():
        if name in ignored:
            continue
        path = ours_by_hf.get(name, name)
        tensors[path] = _transposed(tensor) if _hf_transposed(path) else tensor
    return tensors


def _hf_raw_tensors(root: Path, stack: contextlib.ExitStack) -> dict[str, _Tensor]:
    """Every tensor of the HF weight files, in HF's layout."""
    index = next(
        (root / f for f in _HF_WEIGHT_FILES if f.endswith(".json") and (root / f).exists()), None
    )
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [next(f for f in (HF_SAFETENSORS, HF_TORCH) if (root / f).exists())]
    tensors: dict[str, _Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            tensors.update(_safetensors_tensors(root / file, stack))
        else:
            tensors.update(_torch_tensors(root / file))
    return tensors


def _safetensors_tensors(file: Path, stack: contextlib.ExitStack) -> dict[str, _Tensor]:
    """Lazy slices of a safetensors file (bfloat16 is read through ml_dtypes)."""
    from safetensors import safe_open

    handle = stack.enter_context(safe_open(str(file), framework="numpy"))
    tensors = {}
    for name in handle.keys():
        lazy = handle.get_slice(name)
        tensors[name] = _Tensor(name, tuple(lazy.get_shape()), lazy.__getitem__)
    return tensors


def _torch_tensors(file: Path) -> dict[str, _Tensor]:
    """A pytorch_model.bin, memory-mapped when it is zip-format, else read whole."""
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) serialization cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)

    def reader(tensor: Any) -> Callable[[Index], np.ndarray]:
        return lambda index: tensor[index].to(torch.float32).numpy()

    return {name: _Tensor(name, tuple(t.shape), reader(t)) for name, t in state.items()}


# ---------------------------------------------------------------------------------------------
# t5x
# ---------------------------------------------------------------------------------------------


def _t5x_tensors(root: epath.Path) -> dict[str, _Tensor]:
    """The `optimizer/target` arrays of a t5x checkpoint (msgpack + TensorStore), by our path."""
    contents = serialization.msgpack_restore((root / T5X_MSGPACK).read_bytes())
    target = contents.get("optimizer", {}).get("target") if isinstance(contents, dict) else None
    if not isinstance(target, dict) or contents.get("version", 0) < 2:
        raise CheckpointImportError(
            f"{root / T5X_MSGPACK} is not a t5x checkpoint of version 2 or later "
            "(no 'optimizer/target' parameters)"
        )
    leaves = traverse_util.flatten_dict(target, sep="/", is_leaf=lambda _, v: _is_ts_spec(v))
    return {name: _t5x_tensor(root, name, leaf) for name, leaf in leaves.items()}


def _is_ts_spec(value: Any) -> bool:
    return isinstance(value, dict) and {"driver", "kvstore"} <= value.keys()


def _t5x_tensor(root: epath.Path, name: str, leaf: Any) -> _Tensor:
    if not _is_ts_spec(leaf):
        array = np.asarray(leaf)
        return _Tensor(name, array.shape, array.__getitem__)
    store = ts.open(_absolute_spec(leaf, str(root)), open=True, read=True).result()
    return _Tensor(name, tuple(store.shape), lambda index: store[index].read().result())


def _absolute_spec(spec: Mapping[str, Any], root: str) -> dict[str, Any]:
    """t5x stores paths relative to the checkpoint dir (and a dummy bucket on GCS)."""
    relative = spec["kvstore"]["path"]
    match = re.fullmatch(r"gs://([^/]+)/(.*)", root, re.DOTALL)
    if match:
        kvstore = {"driver": "gcs", "bucket": match[1], "path": f"{match[2]}/{relative}"}
    else:
        kvstore = {"driver": "file", "path": f"{root}/{relative}"}
    return {**spec, "kvstore": kvstore}


# ---------------------------------------------------------------------------------------------
# Ours (orbax)
# ---------------------------------------------------------------------------------------------


def _orbax_shapes(root: epath.Path) -> dict[str, tuple[int, ...]]:
    """Shapes of `state/params` (ours) or `state/target` (t5x's orbax), from orbax's metadata."""

    metadata = checkpoints.state_metadata(root)
    key = t5x_checkpoints.params_key(metadata)
    if key is None:
        raise CheckpointImportError(
            f"{root / checkpoints.STATE_ITEM} holds no 'params' (ours) nor 'target' (t5x's)"
        )
    flat = traverse_util.flatten_dict(metadata[key], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _restore_orbax_as(
    root: epath.Path,
    stored_scanned: bool,
    config: T5Config,
    placement: Mapping[str, NamedSharding],
    dtype: Any,
) -> dict[str, Any]:
    """Restores our `params` in `config`'s layout, whichever layout the checkpoint holds.

    Across the switch, each device restores its slices in the stored layout (the model's
    shardings less or plus the replicated "layers" axis), then one jitted stack or split makes
    the model's layout, placed by `placement`.
    """
    expected = param_shapes(config)
    layout = {path: (expected[path], placement[path]) for path in expected}
    if stored_scanned == config.scan_layers:
        stored = layout
    elif config.scan_layers:
        stored = unstack_layers(layout, _unstacked_layout)
    else:
        stored = stack_layers(layout, _stacked_layout)
    restored = _restore_orbax(root, stored, dtype)
    if stored_scanned != config.scan_layers:
        if config.scan_layers:

            def convert(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
                return stack_layers(flat, lambda xs: jnp.stack(xs, axis=PARAM_SCAN_AXIS))
        else:

            def convert(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
                return unstack_layers(flat, _split_layers)

        restored = jax.jit(convert, out_shardings=dict(placement))(restored)
    return traverse_util.unflatten_dict(restored, sep="/")


def _split_layers(stacked: Any) -> list[Any]:
    """A scanned array's layers (NumPy or JAX)."""
    count = stacked.shape[PARAM_SCAN_AXIS]
    return [stacked.take(i, axis=PARAM_SCAN_AXIS) for i in range(count)]


def _restore_orbax(
    root: epath.Path, layout: Mapping[str, _Layout], dtype: Any
) -> dict[str, jax.Array]:
    """Restores only `params` (not step nor optimizer state), each device its slice; flat."""
    import orbax.checkpoint as ocp

    abstract = traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for p, (shape, s) in layout.items()},
        sep="/",
    )
    key = t5x_checkpoints.params_key(checkpoints.state_metadata(root))
    item = {key: abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        root / checkpoints.STATE_ITEM,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
    return traverse_util.flatten_dict(restored[key], sep="/")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_hf(params: Any, config: T5Config, out_dir: str) -> Path:
    """Writes `config.json` + `model.safetensors` that `T5ForConditionalGeneration` loads.

    Sharded parameters are gathered to host memory one at a time; in multi-process runs every
    process gathers and process 0 writes.
    """
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    tensors = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        array = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for layer_path, layer in unstack_layers({path: array}, _split_layers).items():
            hf_array = layer.T if _hf_transposed(layer_path) else layer
            tensors[_hf_name(layer_path)] = np.ascontiguousarray(hf_array)
    out = Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / HF_SAFETENSORS), metadata={"format": "pt"})
        (out / HF_CONFIG).write_text(json.dumps(t5_config_to_hf_config(config), indent=2) + "\n")
    return out
