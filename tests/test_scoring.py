"""Closed-set scoring and fast label generation: candidates, exact picks, the same labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbs_jax import decoding, label_prediction, scoring
from dsbs_jax.data import cache, choices
from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import Partitioner

VOCAB = 64
CQA_INPUT = (
    "A beaver is know for building prowess, their supplies come from where?\nAnswer Choices:\n"
    "(a) british columbia\n(b) body of water\n(c) wooded area\n(d) pay debts\n(e) zoo"
)


class _IdVocabulary:
    """Texts are the token ids themselves: enough for decode_batches and score_texts."""

    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def tiny() -> tuple[T5, dict]:
    model = T5(get_config("tiny", vocab_size=VOCAB, num_heads=4, head_dim=8, dtype=jnp.float32))
    ones = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(3), ones, ones, enable_dropout=False)["params"]
    return model, params


def _inputs(count: int, seed: int = 0) -> list[list[int]]:
    """Inputs of 3..40 tokens of ids 2..VOCAB-1, each ending in EOS."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, VOCAB, rng.integers(3, 40))) + [1] for _ in range(count)]


def _candidates(count: int, seed: int = 1) -> list[list[list[int]]]:
    """2..5 candidates per input of 1..4 tokens plus EOS."""
    rng = np.random.default_rng(seed)
    return [
        [list(rng.integers(2, VOCAB, rng.integers(1, 5))) + [1] for _ in range(rng.integers(2, 6))]
        for _ in range(count)
    ]


@jax.jit
def _plain_log_probs(params, enc, tgt):
    model = T5(get_config("tiny", vocab_size=VOCAB, num_heads=4, head_dim=8, dtype=jnp.float32))
    dec = jnp.pad(tgt, ((0, 0), (1, 0)))[:, :-1]
    logits = model.apply({"params": params}, enc, dec, tgt, enable_dropout=False)
    return jax.nn.log_softmax(logits[0], axis=-1)


def _plain_log_likelihood(model, params, inputs, candidate) -> tuple[float, int]:
    """One candidate's summed log-likelihood by the plain teacher-forced model call (inputs
    and targets 0-padded to fixed lengths, which the model masks, so it compiles once)."""
    del model  # the same tiny model, rebuilt inside the jitted function
    enc = np.zeros((1, 48), np.int32)
    enc[0, : len(inputs)] = inputs
    tgt = np.zeros((1, 8), np.int32)
    tgt[0, : len(candidate)] = candidate
    log_probs = np.asarray(_plain_log_probs(params, enc, tgt))
    return float(sum(log_probs[i, t] for i, t in enumerate(candidate))), len(candidate)


def test_cqa_input_lists_its_five_choices_and_nli_has_three_labels():
    assert choices.lettered_answer_choices(CQA_INPUT) == (
        "british columbia",
        "body of water",
        "wooded area",
        "pay debts",
        "zoo",
    )
    assert choices.candidates("esnli", "a</s>b") == ("entailment", "neutral", "contradiction")
    assert choices.candidates("svamp", "2 + 3") == ()
    assert choices.candidates("cqa", CQA_INPUT, ["x", "y"]) == ("x", "y")  # the record wins
    with pytest.raises(ValueError, match="input 'q2' of svamp has no candidate labels"):
        choices.candidates_of("svamp", [("q1", "1 + 1", ["2", "3"]), ("q2", "2 + 3", [])])


def test_cache_choices_round_trip_and_are_left_out_when_empty(tmp_path):
    record = cache.TeacherRecord("q", "in", "7", "7", ("r",), "t", True, choices=("6", "7"))
    plain = cache.TeacherRecord("p", "in", "7", "7", ("r",), "t", True)
    cache.write_records(tmp_path / "test.jsonl", [record, plain])
    assert '"choices"' not in (tmp_path / "test.jsonl").read_text().splitlines()[1]
    assert cache.read_records(tmp_path / "test.jsonl") == [record, plain]
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "input": "x", "choices": "a"}\n')
    with pytest.raises(cache.CacheFormatError, match="bad.jsonl:1: 'choices' must be a list"):
        cache.read_examples(tmp_path / "bad.jsonl")


def test_prefix_tree_lists_each_shared_prefix_once():
    candidates = [[5, 6, 1], [5, 1], [7, 1], [5, 6, 1]]
    prefixes, paths = scoring.prefix_tree(candidates)
    assert prefixes == [(), (5,), (5, 6), (7,)]
    assert paths == [[0, 1, 2], [0, 1], [0, 3], [0, 1, 2]]
    assert scoring.tree_size(candidates) == 4
    assert scoring.tree_length([4, scoring.tree_size([[9, 1]])]) == 4
    # Two inputs share row 0 (segments 1 and 2); row 1 is padding.
    packed = scoring.pack_candidates([[candidates, [[9, 1]]], [[], []]], 8, 5, 3)
    assert packed["decoder_input_tokens"][0, :6].tolist() == [0, 5, 6, 7, 0, 9]
    assert packed["decoder_positions"][0, :6].tolist() == [0, 1, 2, 1, 0, 1]
    assert packed["decoder_segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [0] * 8]
    sees = packed["decoder_self_attention_mask"][0]
    assert [np.flatnonzero(sees[node]).tolist() for node in range(6)] == [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 3],
        [4],
        [4, 5],
    ]
    assert packed["candidate_tokens"][0, 1].tolist() == [5, 1, 0]
    assert packed["candidate_prefixes"][0, 1].tolist() == [0, 1, 0]
    assert packed["candidate_tokens"][0, 5].tolist() == [9, 1, 0]  # the second input's slot 0
    assert packed["candidate_prefixes"][0, 5].tolist() == [4, 5, 0]
    assert not packed["candidate_tokens"][0, 4].any() and not packed["candidate_tokens"][1].any()


def test_groups_balance_tree_sizes_and_keep_data_shards_whole():
    sizes = [9, 1, 5, 5, 2, 8, 0, 6]
    groups = scoring.balanced_groups(sizes, 4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    totals = sorted(sum(sizes[i] for i in g) for g in groups)
    assert totals == [17, 19]  # in order, the groups would hold 20 and 16
    assert scoring.trees_per_row(64, 1) == 4
    assert scoring.trees_per_row(64, 32) == 2  # 64 inputs over 32 shards: 2 per shard
    assert scoring.trees_per_row(6, 1) == 2
    assert scoring.trees_per_row(7, 1) == 1


@pytest.mark.parametrize("length_normalized", [False, True])
def test_prefix_tree_scores_equal_a_loop_over_candidates(tiny, length_normalized):
    """All of an input's candidates in one decoder row, as a prefix tree, score as each alone
    does, shared prefixes (one candidate a prefix of another, duplicates) included."""
    model, params = tiny
    inputs, candidates = _inputs(3), _candidates(3)
    candidates[0] += [candidates[0][0][:-1] + [9, 1], [candidates[0][0][0], 1]]
    candidates[1].append(list(candidates[1][0]))
    width = max(len(c) for c in candidates)
    label_length = max(len(ids) for c in candidates for ids in c)
    enc = np.zeros((4, 48), np.int32)
    for i, x in enumerate(inputs):
        enc[i, : len(x)] = x
    assert scoring.tree_size(candidates[0]) < sum(map(len, candidates[0]))  # prefixes shared
    # Two inputs per decoder row: each segment sees only its own input's encoding.
    groups = [candidates[:2], [candidates[2], []]]
    length = scoring.tree_length([sum(scoring.tree_size(c) for c in g) for g in groups])
    packed = scoring.pack_candidates(groups, length, width, label_length)
    scores = np.asarray(
        scoring.candidate_log_likelihoods(model, params, enc, packed, length_normalized)
    )
    assert np.all(scores[3] == -np.inf)  # a padding row
    for i, (x, c) in enumerate(zip(inputs, candidates, strict=True)):
        for j in range(width):
            if j >= len(c):
                assert scores[i, j] == -np.inf
                continue
            total, count = _plain_log_likelihood(model, params, x, c[j])
            expected = total / count if length_normalized else total
            np.testing.assert_allclose(scores[i, j], expected, rtol=1e-5, atol=1e-5)


def test_score_mode_picks_the_argmax_of_independent_scores(tiny):
    model, params = tiny
    inputs, candidates = _inputs(11, seed=4), _candidates(11, seed=5)
    vocabulary = _IdVocabulary()
    texts = [[vocabulary.decode(t[:-1]) for t in c] for c in candidates]
    picked = label_prediction.score_texts(
        model, params, Partitioner(devices=jax.devices()[:1]), vocabulary, inputs, texts, 48, 4, 8
    )
    expected = []
    for x, c, t in zip(inputs, candidates, texts, strict=True):
        totals = [_plain_log_likelihood(model, params, x, ids)[0] for ids in c]
        expected.append(t[int(np.argmax(totals))])
    assert picked == expected
    assert len(set(picked)) > 1


def test_length_sorted_generation_gives_todays_labels(tiny):
    """Sorted, length-bucketed batches decode exactly what padding every input to the full
    length in order does, including rows that stop at EOS early."""
    model, params = tiny
    inputs = _inputs(13, seed=6)
    inputs_length, steps = 96, 6
    full = np.zeros((len(inputs), inputs_length), np.int32)
    for i, x in enumerate(inputs):
        full[i, : len(x)] = x
    never = np.asarray(decoding.greedy_decode(model, params, full, steps, eos_id=-1))
    eos_id = int(np.bincount(never[:, 2]).argmax())  # ends several rows at step 3
    vocabulary = _IdVocabulary()
    vocabulary.eos_id = eos_id
    todays = [
        label_prediction.decode_text(vocabulary, row, eos_id)
        for row in np.asarray(decoding.greedy_decode(model, params, full, steps, eos_id))
    ]
    assert any(len(t.split()) < steps for t in todays)
    fast = label_prediction.decode_batches(
        model,
        params,
        Partitioner(devices=jax.devices()[:1]),
        vocabulary,
        inputs,
        inputs_length,
        4,
        steps,
    )
    assert fast == todays


def test_padded_lengths_step_by_quarter_octaves_within_the_input_length():
    lengths = [label_prediction.padded_length(n, 512) for n in (1, 32, 33, 100, 300, 511)]
    assert lengths == [32, 32, 40, 112, 320, 512]
    grid = sorted({label_prediction.padded_length(n, 4096) for n in range(1, 4097)})
    assert grid[:10] == [32, 40, 48, 56, 64, 80, 96, 112, 128, 160]
    assert all(b <= 1.25 * a and b % 8 == 0 for a, b in zip(grid, grid[1:], strict=False))
    inputs = [[5] * 40, [5] * 3, [5] * 20, [5] * 30, [5] * 2]
    batches = list(label_prediction.length_sorted_batches(inputs, 128, 2))
    assert [list(p) for p, _ in batches] == [[4], [1, 2], [3, 0]]  # the partial batch first
    assert [t.shape for _, t in batches] == [(2, 32), (2, 32), (2, 40)]
    by_size = label_prediction.length_sorted_batches(inputs, 128, 2, sizes=[1, 9, 1, 1, 5])
    assert [list(p) for p, _ in by_size] == [[2], [3, 4], [1, 0]]  # by size within 32 tokens
    fine = label_prediction.length_sorted_batches(
        inputs, 128, 2, row_multiple=1, steps_per_octave=8
    )
    assert [t.shape for _, t in fine] == [(1, 32), (2, 32), (2, 40)]  # a one-row partial batch
    eighths = sorted({label_prediction.padded_length(n, 4096, 8) for n in range(1, 4097)})
    assert eighths[:10] == [32, 36, 40, 44, 48, 52, 56, 60, 64, 72]
    assert all(b <= 1.125 * a and b % 4 == 0 for a, b in zip(eighths, eighths[1:], strict=False))
