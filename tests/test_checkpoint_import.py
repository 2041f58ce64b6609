"""Pretrained T5 import: tiny random PyTorch T5s, loaded and checked against PyTorch's outputs.

Covers the Hugging Face layouts (safetensors, pytorch_model.bin, sharded indexes), a t5x
checkpoint written here (msgpack + zarr), our own orbax checkpoints, the export back to
Hugging Face, the error messages, the convert CLI and `spiece.model` as a seqio vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import sentencepiece
import seqio
import tensorstore as ts
import torch
import transformers
from flax import serialization, traverse_util
from safetensors.numpy import load_file, save_file

from dsbs_jax import convert
from dsbs_jax.checkpoint_import import (
    CheckpointImportError,
    checkpoint_config,
    export_hf,
    hf_config_to_t5_config,
    load_params,
    param_shardings,
    t5_config_to_hf_config,
)
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.data.vocab import train_sentencepiece
from dsbs_jax.models.t5 import T5, T5Config
from dsbs_jax.partitioning import Partitioner
from tests.conftest import assert_same_arrays

VOCAB = 64
VARIANTS = {
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}
# Two examples of different lengths (encoder inputs, decoder targets), long enough to reach
# the log-spaced relative-position buckets.
EXAMPLES = [(20, 12), (13, 9)]
TOLERANCE = 1e-4
F32 = dict(dtype=jnp.float32)  # compare in float32 (the model's default dtype is bfloat16)


def make_hf_model(variant: str) -> transformers.T5ForConditionalGeneration:
    """A tiny random PyTorch T5 with non-trivial layer norms (and an untied lm_head for 1.1)."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        decoder_start_token_id=0,
        **VARIANTS[variant],
    )
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        if not VARIANTS[variant]["tie_word_embeddings"]:
            # transformers 5 ties lm_head in memory even for T5 1.1; untie it for real.
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def partitioner() -> Partitioner:
    return Partitioner(num_partitions=2)  # 4 x 2 mesh: vocab, heads and mlp split in two


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """variant -> (PyTorch model, its save_pretrained directory)."""
    result = {}
    for variant in VARIANTS:
        model = make_hf_model(variant)
        directory = tmp_path_factory.mktemp(f"hf_{variant}")
        model.save_pretrained(directory)
        result[variant] = (model, directory)
    return result


def config_of(directory: Path) -> T5Config:
    return hf_config_to_t5_config(json.loads((directory / "config.json").read_text()), **F32)


def load(path: Path, config: T5Config, partitioner: Partitioner) -> dict:
    return load_params(str(path), config, param_shardings(config, partitioner))


@pytest.fixture(scope="module")
def loaded(hf, partitioner) -> dict[str, tuple[T5Config, dict]]:
    """variant -> (config, params) loaded from the safetensors directory."""
    return {
        variant: (config_of(directory), load(directory, config_of(directory), partitioner))
        for variant, (_, directory) in hf.items()
    }


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_json_maps_to_our_config_and_back(hf, variant: str) -> None:
    config = config_of(hf[variant][1])
    gated = variant == "v1_1"
    assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim) == (64, 32, 4, 8)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.mlp_dim) == (2, 2, 64)
    assert config.mlp_activations == (("gelu", "linear") if gated else ("relu",))
    assert config.logits_via_embedding is not gated
    assert hf_config_to_t5_config(t5_config_to_hf_config(config), **F32) == config


def test_pre_transformers_5_config_reads_tying_as_scaling() -> None:
    """Old T5 1.1 configs say `tie_word_embeddings: false` and nothing about scaling."""
    old = dict(vocab_size=8, d_model=4, d_kv=2, num_heads=2, num_layers=1, d_ff=8)
    assert not hf_config_to_t5_config({**old, "tie_word_embeddings": False}).logits_via_embedding
    assert hf_config_to_t5_config(old).logits_via_embedding


# ---------------------------------------------------------------------------------------------
# Numerics against PyTorch
# ---------------------------------------------------------------------------------------------


def make_examples() -> list[tuple[np.ndarray, np.ndarray]]:
    """(encoder inputs, decoder inputs starting with the 0 start token) per example."""
    rng = np.random.default_rng(0)
    return [
        (rng.integers(2, VOCAB, n_in), np.concatenate([[0], rng.integers(2, VOCAB, n_out - 1)]))
        for n_in, n_out in EXAMPLES
    ]


def pad(rows: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def packed(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One packed row: tokens, segment ids (1, 2, ...) and per-segment positions."""
    tokens = np.concatenate(arrays)[None]
    segments = np.concatenate([np.full(len(a), i + 1) for i, a in enumerate(arrays)])[None]
    positions = np.concatenate([np.arange(len(a)) for a in arrays])[None]
    return tokens.astype(np.int32), segments.astype(np.int32), positions.astype(np.int32)


def ours(config: T5Config, params: dict, partitioner: Partitioner, **batch) -> tuple:
    """(encoder output, logits) of our model, jitted on the partitioner's mesh."""
    model = T5(config)

    def forward(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        variables = {"params": params}
        encoded = model.apply(
            variables,
            batch["encoder_input_tokens"],
            batch.get("encoder_segment_ids"),
            batch.get("encoder_positions"),
            enable_dropout=False,
            method=T5.encode,
        )
        logits = model.apply(
            variables,
            encoded,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch.get("decoder_target_tokens"),
            batch.get("encoder_segment_ids"),
            batch.get("decoder_segment_ids"),
            batch.get("decoder_positions"),
            enable_dropout=False,
            method=T5.decode,
        )
        return encoded, logits

    with partitioner.activation_rules():
        encoded, logits = jax.jit(forward)(params, batch)
    return np.asarray(encoded), np.asarray(logits)


def pytorch(model: transformers.T5ForConditionalGeneration, inputs, decoder_inputs) -> tuple:
    inputs = torch.as_tensor(np.asarray(inputs, np.int64))
    with torch.no_grad():
        out = model(
            input_ids=inputs,
            attention_mask=inputs > 0,
            decoder_input_ids=torch.as_tensor(np.asarray(decoder_inputs, np.int64)),
        )
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_pytorch_unpacked_and_packed(hf, loaded, partitioner, variant: str) -> None:
    model = hf[variant][0]
    config, params = loaded[variant]
    examples = make_examples()
    inputs, decoder_inputs = pad([e[0] for e in examples]), pad([e[1] for e in examples])
    want_encoded, want_logits = pytorch(model, inputs, decoder_inputs)
    got_encoded, got_logits = ours(
        config,
        params,
        partitioner,
        encoder_input_tokens=inputs,
        decoder_input_tokens=decoder_inputs,
    )
    for row, (n_in, n_out) in enumerate(EXAMPLES):  # padding positions are not compared
        assert np.abs(got_encoded[row, :n_in] - want_encoded[row, :n_in]).max() < TOLERANCE
        assert np.abs(got_logits[row, :n_out] - want_logits[row, :n_out]).max() < TOLERANCE

    encoder_tokens, encoder_segments, encoder_positions = packed([e[0] for e in examples])
    decoder_tokens, decoder_segments, decoder_positions = packed([e[1] for e in examples])
    got_encoded, got_logits = ours(
        config,
        params,
        partitioner,
        encoder_input_tokens=encoder_tokens,
        decoder_input_tokens=decoder_tokens,
        decoder_target_tokens=decoder_segments,  # only its non-zero-ness (validity) matters
        encoder_segment_ids=encoder_segments,
        decoder_segment_ids=decoder_segments,
        encoder_positions=encoder_positions,
        decoder_positions=decoder_positions,
    )
    starts = np.cumsum([[0, 0]] + EXAMPLES, axis=0)
    for (inputs_i, decoder_i), (s_in, s_out), (n_in, n_out) in zip(
        examples, starts, EXAMPLES, strict=False
    ):
        want_encoded, want_logits = pytorch(model, inputs_i[None], decoder_i[None])
        assert np.abs(got_encoded[0, s_in : s_in + n_in] - want_encoded[0]).max() < TOLERANCE
        assert np.abs(got_logits[0, s_out : s_out + n_out] - want_logits[0]).max() < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_params_land_in_their_shardings(loaded, partitioner) -> None:
    config, params = loaded["v1_1"]
    shardings = param_shardings(config, partitioner)
    for path, array in traverse_util.flatten_dict(params, sep="/").items():
        assert array.sharding == traverse_util.flatten_dict(shardings, sep="/")[path], path
        assert array.dtype == jnp.float32
    embedding = params["token_embedder"]["embedding"]
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(VOCAB // 2, 32)}


def write_torch_bin(model: transformers.PreTrainedModel, source: Path, out: Path) -> None:
    """pytorch_model.bin as transformers 4 wrote it (with the tied embedding copies)."""
    out.mkdir()
    shutil.copy(source / "config.json", out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")


def write_sharded_legacy_bin(model: transformers.PreTrainedModel, source: Path, out: Path) -> None:
    """Two pre-zip (non-memory-mappable) .bin shards and their index."""
    out.mkdir()
    shutil.copy(source / "config.json", out)
    state = model.state_dict()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, out / file, _use_new_zipfile_serialization=False)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors", "sharded bin"])
def test_other_hf_layouts_load_identically(hf, loaded, partitioner, tmp_path, layout) -> None:
    model, directory = hf["v1_1"]
    out = tmp_path / "model"
    if layout == "pytorch_model.bin":
        write_torch_bin(model, directory, out)
    elif layout == "sharded safetensors":
        model.save_pretrained(out, max_shard_size="20KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:
        write_sharded_legacy_bin(model, directory, out)
    config, params = loaded["v1_1"]
    assert_same_arrays(load(out, config, partitioner), params)


def test_transformers_5_tied_t5_1_1_reads_shared_as_lm_head(partitioner, tmp_path) -> None:
    """transformers 5 ties even T5 1.1 in memory and then writes no lm_head.weight."""
    model = make_hf_model("v1_1")
    model.tie_weights()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    config = config_of(tmp_path)
    assert not config.logits_via_embedding
    params = load(tmp_path, config, partitioner)
    np.testing.assert_array_equal(
        np.asarray(params["decoder"]["logits_dense"]["kernel"]),
        np.asarray(params["token_embedder"]["embedding"]).T,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_round_trips_exactly(hf, loaded, partitioner, tmp_path, variant: str) -> None:
    config, params = loaded[variant]
    out = export_hf(params, config, str(tmp_path / "exported"))
    assert_same_arrays(load(out, config_of(out), partitioner), params)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out)
    original = hf[variant][0].state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def write_t5x_checkpoint(params: dict, directory: Path) -> dict:
    """t5x's version-3 layout; returns the params as they were written (embedding in bf16)."""
    written, target = {}, {}
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        array = np.asarray(value)
        if array.ndim < 2:  # small arrays sit in the msgpack
            written[path] = target[path] = array
            continue
        if path == "token_embedder/embedding":
            array = array.astype(ml_dtypes.bfloat16)
        name = "target." + path.replace("/", ".")
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": name},
            "metadata": {
                "shape": list(array.shape),
                "chunks": [max(1, n // 2) for n in array.shape],
                "dtype": "bfloat16" if array.dtype == ml_dtypes.bfloat16 else "<f4",
                "compressor": {"id": "gzip"},
            },
        }
        absolute = {**spec, "kvstore": {"driver": "file", "path": str(directory / name)}}
        ts.open(absolute, create=True).result().write(array).result()
        target[path] = spec
        written[path] = array.astype(np.float32)
    contents = {
        "version": 3,
        "optimizer": {
            "target": traverse_util.unflatten_dict(target, sep="/"),
            "state": {"step": np.int32(1000), "param_states": {}},
        },
    }
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    return traverse_util.unflatten_dict(written, sep="/")


def test_t5x_checkpoint_loads(loaded, partitioner, tmp_path) -> None:
    config, params = loaded["v1_1"]
    directory = tmp_path / "checkpoint_1000"
    directory.mkdir()
    written = write_t5x_checkpoint(params, directory)
    assert checkpoint_config(str(tmp_path), **F32) == config  # a MODEL_DIR: its latest step
    assert_same_arrays(load(tmp_path, config, partitioner), written)


def test_our_checkpoint_loads_params_only(loaded, partitioner, tmp_path) -> None:
    config, params = loaded["original"]
    state = {"step": jnp.int32(7), "params": params, "opt_state": {"mu": jnp.ones(3)}}
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(7, state, {}, force=True)
    assert checkpoint_config(str(tmp_path), **F32) == config
    for path in (tmp_path, tmp_path / "checkpoint_7"):
        assert_same_arrays(load(path, config, partitioner), params)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def edited_copy(directory: Path, out: Path, edit) -> Path:
    """A copy of an HF directory whose tensors went through `edit(dict) -> None`."""
    out.mkdir()
    shutil.copy(directory / "config.json", out)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


WO = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
WI_0 = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
EXTRA = "encoder.block.0.layer.0.SelfAttention.extra.weight"
EDITS = {
    "missing": (lambda t: t.pop(WO), f"missing: {WO}"),
    "unexpected": (lambda t: t.update({EXTRA: np.zeros(2, np.float32)}), f"unexpected: {EXTRA}"),
    "wrong shape": (
        lambda t: t.update({WI_0: np.zeros((64, 16), np.float32)}),
        f"wrong shape: {WI_0} [64, 16] (model needs [64, 32])",
    ),
}


@pytest.mark.parametrize("case", EDITS)
def test_bad_checkpoint_names_the_parameter(hf, partitioner, tmp_path, case: str) -> None:
    edit, message = EDITS[case]
    directory = edited_copy(hf["v1_1"][1], tmp_path / "edited", edit)
    with pytest.raises(
        CheckpointImportError, match=rf"^cannot load .*{re.escape(message)}$"
    ) as error:
        load(directory, config_of(directory), partitioner)
    assert ";" not in str(error.value)  # this one problem, nothing else


def test_vocab_mismatch_is_one_problem(hf, partitioner) -> None:
    directory = hf["v1_1"][1]
    config = dataclasses.replace(config_of(directory), vocab_size=128)
    with pytest.raises(CheckpointImportError) as error:
        load(directory, config, partitioner)
    assert str(error.value).endswith(
        "vocabulary size 64 in the checkpoint but 128 in the model "
        "(set the model's vocab_size to the checkpoint's)"
    )


def test_many_problems_are_summarised(hf, partitioner) -> None:
    directory = hf["original"][1]
    config = dataclasses.replace(config_of(directory), num_encoder_layers=3)
    with pytest.raises(
        CheckpointImportError, match=r"missing: encoder\.block\.2\.\S+, \S+, \S+ and 5 more$"
    ):
        load(directory, config, partitioner)


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointImportError, match="is not a checkpoint: expected a Hugging Face"):
        checkpoint_config(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_convert_round_trip_hf_ours_hf(hf, tmp_path, capsys) -> None:
    source = hf["v1_1"][1]
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    assert convert.main(["--from", str(source), "--to", str(ours_dir), "--format", "ours"]) == 0
    assert (ours_dir / "checkpoint_0" / "state").is_dir()
    assert convert.main(["--from", str(ours_dir), "--to", str(hf_dir), "--format", "hf"]) == 0
    want, got = load_file(source / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert config_of(hf_dir) == config_of(source)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "/no/such/dir"], "no checkpoint directory at /no/such/dir"),
        (["--preset", "small"], "--preset is for t5x and our checkpoints"),
        (["--vocab_size", "128"], "vocabulary size 64 in the checkpoint but 128 in the model"),
    ],
)
def test_convert_bad_input_is_one_line_and_status_2(hf, tmp_path, capsys, args, message) -> None:
    base = {"--from": str(hf["v1_1"][1]), "--to": str(tmp_path / "out"), "--format": "ours"}
    base.update(zip(args[::2], args[1::2], strict=True))
    assert convert.main([item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_convert_refuses_a_non_empty_output(hf, tmp_path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    argv = ["--from", str(hf["v1_1"][1]), "--to", str(tmp_path / "out"), "--format", "hf"]
    assert convert.main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def test_hf_spiece_model_is_a_seqio_vocabulary(tmp_path) -> None:
    """An HF T5 directory's spiece.model serves as VOCABULARY_PATH with EXTRA_IDS=100."""
    texts = [f"question {i}: how many apples are left after eating {i % 7}?" for i in range(200)]
    model = train_sentencepiece(texts, tmp_path / "spiece", vocab_size=40)
    assert model == tmp_path / "spiece.model"
    vocabulary = seqio.SentencePieceVocabulary(str(model), extra_ids=100)
    base = sentencepiece.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    assert vocabulary.vocab_size == base + 100
    ids = vocabulary.encode("how many apples are left?")
    assert vocabulary.decode(ids) == "how many apples are left?"
    assert vocabulary.decode([base + 99]) == "<extra_id_0>"
