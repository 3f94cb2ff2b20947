"""Packed-batch pipeline: order, epochs, JSON state round trips, host sharding, eval padding, example batches."""
import json

import numpy as np
import pytest

from configurable_fm.data.pipeline import (PackedBatches, epoch_order, eval_batches, eval_example_batches,
                                           from_examples)

L = 8


def stream(num_windows, extra=3, dtype=np.int64):
    """Tokens 0..n-1, so window i starts with token i*L: window ids can be read off the inputs."""
    return np.arange(num_windows * L + 1 + extra, dtype=dtype)


def window_ids(batch):
    return batch["inputs"][:, 0] // L


class ChunkedStream:
    """A TokenStream-like object over several chunks (like shards): len() and slicing only."""

    def __init__(self, chunks):
        self.chunks = [np.asarray(c, np.int32) for c in chunks]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, s):
        assert isinstance(s, slice) and s.step is None
        return np.concatenate([c[max(0, s.start - a):max(0, s.stop - a)] for c, a in zip(self.chunks, self.starts)])


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_windows_targets_and_dtype():
    tokens = stream(10)
    it = PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=0, shuffle=False)
    assert it.num_windows == 10 and it.batches_per_epoch == 2 and it.tokens_per_batch == 32
    b = next(it)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32 and b["inputs"].shape == (4, L)
    for r, w in enumerate(range(4)):  # unshuffled: windows 0..3, window w = tokens[w*L : w*L+L+1]
        np.testing.assert_array_equal(b["inputs"][r], tokens[w * L:w * L + L])
        np.testing.assert_array_equal(b["targets"][r], tokens[w * L + 1:w * L + L + 1])


def test_any_sliceable_stream_gives_same_batches():
    tokens = stream(12)
    chunked = ChunkedStream(np.split(tokens, [5, 40, 41]))
    a = PackedBatches(tokens, seq_len=L, global_batch_size=3, seed=7)
    b = PackedBatches(chunked, seq_len=L, global_batch_size=3, seed=7)
    assert_batches_equal(take(a, 9), take(b, 9))


def test_deterministic_and_seed_dependent():
    tokens = stream(20)
    a = take(PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=3), 6)
    b = take(PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=3), 6)
    c = take(PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=4), 6)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_order_is_the_documented_permutation():
    tokens = stream(20)
    it = PackedBatches(tokens, seq_len=L, global_batch_size=5, seed=11)
    perm0 = np.random.Generator(np.random.PCG64([11, 0])).permutation(20)
    perm1 = np.random.Generator(np.random.PCG64([11, 1])).permutation(20)
    ids = np.concatenate([window_ids(b) for b in take(it, 8)])
    np.testing.assert_array_equal(ids, np.concatenate([perm0, perm1]))
    np.testing.assert_array_equal(epoch_order(20, 11, 1), perm1)


def test_every_window_once_per_epoch_and_epochs_differ():
    tokens = stream(23)
    it = PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=0)  # 5 batches/epoch, 3 windows dropped
    epochs = []
    for e in range(3):
        assert it.epoch == e and it.index == 0
        ids = np.concatenate([window_ids(b) for b in take(it, it.batches_per_epoch)])
        assert len(set(ids.tolist())) == len(ids) == 20 and ids.max() < 23
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert set(np.concatenate(epochs).tolist()) == set(range(23))  # dropped windows differ between epochs


def test_no_drop_remainder_straddles_epochs_without_losing_windows():
    tokens = stream(10)
    it = PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=1, drop_remainder=False)
    assert it.batches_per_epoch == 3
    ids = np.concatenate([window_ids(b) for b in take(it, 5)])  # 20 windows = exactly two epochs
    assert sorted(ids[:10].tolist()) == list(range(10)) and sorted(ids[10:].tolist()) == list(range(10))
    assert (it.epoch, it.index) == (2, 0)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_state_round_trip_through_json_across_epoch_boundary(drop_remainder):
    tokens = stream(11)
    kw = dict(seq_len=L, global_batch_size=3, seed=5, drop_remainder=drop_remainder)
    ref = PackedBatches(tokens, **kw)
    reference = take(ref, 12)
    for k in (0, 2, 3, 4, 7):  # 3 (drop) / ~3.7 (no drop) batches per epoch: several restores cross an epoch
        it = PackedBatches(tokens, **kw)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        fresh = PackedBatches(tokens, **kw)
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 12 - k), reference[k:])


def test_incompatible_state_is_refused_naming_the_setting():
    tokens = stream(12)
    it = PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=0)
    next(it)
    state = it.get_state()
    cases = {
        "seq_len": PackedBatches(tokens, seq_len=4, global_batch_size=4, seed=0),
        "global_batch_size": PackedBatches(tokens, seq_len=L, global_batch_size=2, seed=0),
        "seed": PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=1),
        "shuffle": PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=0, shuffle=False),
        "drop_remainder": PackedBatches(tokens, seq_len=L, global_batch_size=4, seed=0, drop_remainder=False),
        "num_tokens": PackedBatches(stream(12, extra=4), seq_len=L, global_batch_size=4, seed=0),
        "data_crc32": PackedBatches(tokens[::-1].copy(), seq_len=L, global_batch_size=4, seed=0),
    }
    for setting, other in cases.items():
        with pytest.raises(ValueError, match=setting):
            other.set_state(state)
    with pytest.raises(ValueError, match="version"):
        it.set_state({**state, "version": 99})
    with pytest.raises(ValueError, match="index"):
        it.set_state({**state, "index": 11})
    with pytest.raises(ValueError, match="epoch"):
        it.set_state({**state, "epoch": -1})
    with pytest.raises(ValueError, match="lacks setting 'seed'"):
        it.set_state({k: v for k, v in state.items() if k != "seed"})


def test_process_sharding_rows_concatenate_to_the_global_batch():
    tokens = stream(30)
    kw = dict(seq_len=L, global_batch_size=6, seed=2)
    single = take(PackedBatches(tokens, **kw), 8)
    for count in (2, 3):
        parts = [take(PackedBatches(tokens, **kw, process_index=p, process_count=count), 8) for p in range(count)]
        for k in range(8):
            assert parts[0][k]["inputs"].shape == (6 // count, L)
            for key in ("inputs", "targets"):
                np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), single[k][key])
    # The state is global: a 1-process state restores into 2 processes, which continue the same global batches.
    one = PackedBatches(tokens, **kw)
    take(one, 3)
    state = json.loads(json.dumps(one.get_state()))
    halves = [PackedBatches(tokens, **kw, process_index=p, process_count=2) for p in range(2)]
    for h in halves:
        h.set_state(state)
    for k in range(3, 8):
        np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), single[k]["inputs"])
    with pytest.raises(ValueError, match="process_count=4"):
        PackedBatches(tokens, **kw, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        PackedBatches(tokens, **kw, process_index=2, process_count=2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="holds no window"):
        PackedBatches(np.arange(L), seq_len=L, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedBatches(stream(3), seq_len=L, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        PackedBatches(np.zeros((4, 40), np.int32), seq_len=L, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        PackedBatches(stream(4), seq_len=L, global_batch_size=1, seed=-1)
    with pytest.raises(TypeError, match="dtype float"):
        next(PackedBatches(np.arange(40, dtype=np.float32), seq_len=L, global_batch_size=1, seed=0))


def test_bad_eval_seq_len_and_unbatched_examples_are_clear_errors():
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):  # was ZeroDivisionError
        list(eval_batches(stream(4), 0, 2))
    with pytest.raises(ValueError, match=r"examples\['inputs'\] must be \(N, L\), got shape \(\)"):  # was len() of
        from_examples({"inputs": np.int32(3), "targets": np.int32(3)}, batch_size=1, seed=0)  # an unsized object


@pytest.mark.parametrize("batch_size,process_count", [(4, 1), (5, 1), (4, 2), (13, 1)])
def test_eval_batches_count_every_target_once(batch_size, process_count):
    tokens = stream(13, extra=5)  # 13 windows; 5 trailing tokens do not fill a window
    batches = [list(eval_batches(tokens, L, batch_size, process_index=p, process_count=process_count))
               for p in range(process_count)]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == -(-13 // batch_size)
    targets, weight = [], 0.0
    for k in range(len(batches[0])):
        for p in range(process_count):
            b = batches[p][k]
            assert b["inputs"].shape == (batch_size // process_count, L) and b["mask"].dtype == np.float32
            np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
            targets.append(b["targets"][b["mask"] == 1])
            assert not b["inputs"][b["mask"] == 0].any()  # padding rows are zeros
            weight += b["mask"].sum() * L
    np.testing.assert_array_equal(np.concatenate(targets).ravel(), tokens[1:13 * L + 1])
    assert weight == 13 * L
    assert len(list(eval_batches(tokens, L, batch_size, max_batches=1))) == 1


def examples(n=10, length=6):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (n, length))
    return {"inputs": x, "targets": np.roll(x, -1, axis=1), "loss_mask": (rng.random((n, length)) > 0.5),
            "example_id": np.arange(n)}


def test_from_examples_epochs_state_and_sharding():
    data = examples()
    before = {k: v.copy() for k, v in data.items()}
    it = from_examples(data, batch_size=3, seed=4)
    assert it.batches_per_epoch == 3
    b = next(it)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == (3, 6)
    ids = data["example_id"][b["example_id"]]
    np.testing.assert_array_equal(b["loss_mask"], data["loss_mask"][ids].astype(np.float32))
    np.testing.assert_array_equal(b["inputs"], data["inputs"][ids])
    epoch_ids = [np.concatenate([b["example_id"]] + [next(it)["example_id"] for _ in range(2)])]
    epoch_ids.append(np.concatenate([next(it)["example_id"] for _ in range(3)]))
    for e in epoch_ids:
        assert len(set(e.tolist())) == 9
    assert not np.array_equal(epoch_ids[0], epoch_ids[1])
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = from_examples(data, batch_size=3, seed=4)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), expected)
    halves = [from_examples(data, batch_size=4, seed=1, process_index=p, process_count=2) for p in range(2)]
    whole = from_examples(data, batch_size=4, seed=1)
    for _ in range(4):
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["example_id"] for p in parts]), next(whole)["example_id"])
    changed = dict(data, targets=data["targets"] + 1)
    with pytest.raises(ValueError, match="data_crc32"):
        from_examples(changed, batch_size=3, seed=4).set_state(state)
    with pytest.raises(ValueError, match="kind"):
        PackedBatches(stream(10), seq_len=L, global_batch_size=3, seed=4).set_state(state)
    for k in data:
        np.testing.assert_array_equal(data[k], before[k])  # inputs never modified


def test_examples_validation_and_eval():
    data = examples(7)
    with pytest.raises(KeyError, match="targets"):
        from_examples({"inputs": data["inputs"]}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="loss_mask"):
        from_examples(dict(data, loss_mask=data["loss_mask"][:, :3]), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="example_id"):
        from_examples(dict(data, example_id=np.arange(3)), batch_size=2, seed=0)
    no_mask = from_examples({"inputs": data["inputs"], "targets": data["targets"]}, batch_size=2, seed=0)
    assert next(no_mask)["loss_mask"].min() == 1.0
    batches = list(eval_example_batches(data, batch_size=3))
    assert len(batches) == 3 and batches[-1]["mask"].tolist() == [1.0, 0.0, 0.0]
    got = np.concatenate([b["example_id"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(got, np.arange(7))
    with pytest.raises(ValueError, match="'mask'"):
        next(eval_example_batches(dict(data, mask=data["loss_mask"]), batch_size=3))
