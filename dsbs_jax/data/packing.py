"""First-fit packing: SeqIO's packed layout, with fewer padding tokens.

SeqIO's packer (without its custom ops, which need a custom-built binary) fills one
row at a time and closes it as soon as the next example does not fit, so every row
loses about one example's worth of tokens. Here every row opened within a window of
examples stays open: each example goes into the first row where all of its features
fit, and a new row is opened only when none has room. The output has SeqIO's packed
features exactly (`<k>`, `<k>_segment_ids`, `<k>_positions`), so feature converters
and models cannot tell the difference, and it is deterministic, so a resumed run
replays the same batches.

Rows come out in the order they were opened, and an example never lands in a row
opened before the window it belongs to, so examples stay near their place in the stream:
the two examples of a step-by-step pair land in rows of the same window.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from dsbs_jax.errors import UserError

DEFAULT_WINDOW = 1024


def first_fit_pack_dataset(
    dataset: tf.data.Dataset, feature_lengths: Mapping[str, int], window: int = DEFAULT_WINDOW
) -> tf.data.Dataset:
    """Trims each feature to its length and packs examples first-fit, `window` at a time.

    Like `seqio.utils.trim_and_pack_dataset`: features not in `feature_lengths` are
    dropped, token 0 is padding, and every packed feature is int32.
    """
    if window < 1:
        raise UserError(f"the packing window must hold at least one example, got {window}")
    for k in feature_lengths:
        if k not in dataset.element_spec:
            raise ValueError(
                f"feature {k!r} not found in dataset; available: {list(dataset.element_spec)}"
            )
        if not dataset.element_spec[k].shape.is_compatible_with([None]):
            raise ValueError(f"features to pack must be one-dimensional; {k!r} is not")
    lengths = dict(feature_lengths)
    ds = dataset.map(
        lambda ex: {k: tf.cast(ex[k][:n], tf.int32) for k, n in lengths.items()},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.padded_batch(window, padded_shapes={k: [None] for k in lengths})
    ds = ds.map(lambda batch: _pack_window(batch, lengths), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch()


def _pack_window(
    batch: Mapping[str, tf.Tensor], feature_lengths: Mapping[str, int]
) -> dict[str, tf.Tensor]:
    """Packs one padded batch of examples into as few rows as first fit finds."""
    keys = list(feature_lengths)
    # An example's length is its count of non-padding tokens, as SeqIO's packer counts it.
    sizes = tf.stack([tf.reduce_sum(tf.cast(batch[k] != 0, tf.int32), axis=1) for k in keys], 1)
    capacity = tf.constant([feature_lengths[k] for k in keys], tf.int32)
    rows, offsets, segments, num_rows = _first_fit(sizes, capacity)

    packed = {}
    for i, k in enumerate(keys):
        values = batch[k]
        length = feature_lengths[k]
        token = tf.where(tf.sequence_mask(sizes[:, i], tf.shape(values)[1]))  # (example, position)
        example, position = token[:, 0], tf.cast(token[:, 1], tf.int32)
        at = tf.stack(
            [tf.gather(rows, example), tf.gather(offsets[:, i], example) + position], axis=1
        )
        shape = tf.stack([num_rows, length])
        packed[k] = tf.scatter_nd(at, tf.gather_nd(values, token), shape)
        packed[f"{k}_positions"] = tf.scatter_nd(at, position, shape)
        packed[f"{k}_segment_ids"] = tf.scatter_nd(at, tf.gather(segments, example), shape)
    return packed


def _first_fit(
    sizes: tf.Tensor, capacity: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Places examples (rows of `sizes`, one column per feature) into rows of `capacity`.

    Returns each example's row, its offset in that row per feature, its segment id (1 for
    the first example of a row, 2 for the next, ...), and the number of rows used.
    """
    num_examples = tf.shape(sizes)[0]
    slots = tf.range(num_examples)  # never more rows than examples

    def place(i, fill, count, num_rows, rows, offsets, segments):
        size = sizes[i]
        fits = tf.reduce_all(fill + size <= capacity, axis=1) & (slots < num_rows)
        row = tf.where(
            tf.reduce_any(fits), tf.cast(tf.argmax(tf.cast(fits, tf.int32)), tf.int32), num_rows
        )
        rows = rows.write(i, row)
        offsets = offsets.write(i, fill[row])
        segments = segments.write(i, count[row] + 1)
        fill = tf.tensor_scatter_nd_add(fill, [[row]], [size])
        count = tf.tensor_scatter_nd_add(count, [[row]], [1])
        return i + 1, fill, count, tf.maximum(num_rows, row + 1), rows, offsets, segments

    _, _, _, num_rows, rows, offsets, segments = tf.while_loop(
        lambda i, *_: i < num_examples,
        place,
        (
            tf.constant(0),
            tf.zeros(tf.stack([num_examples, tf.shape(sizes)[1]]), tf.int32),
            tf.zeros([num_examples], tf.int32),
            tf.constant(0),
            tf.TensorArray(tf.int32, size=num_examples),
            tf.TensorArray(tf.int32, size=num_examples),
            tf.TensorArray(tf.int32, size=num_examples),
        ),
    )
    return rows.stack(), offsets.stack(), segments.stack(), num_rows
