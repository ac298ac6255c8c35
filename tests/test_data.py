"""Calibration inputs in every accepted form, and the checks on them."""
from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.core.data import InputSpec, open_source, split
from onnxcompress.core.errors import DataError

SPECS = [InputSpec("x", np.dtype(np.float32), (None, 4))]


def feeds(source):
    return [f["x"] for f in source]


def test_npz_is_batched(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.ones((10, 4), np.float32))
    batches = feeds(open_source(tmp_path / "c.npz", SPECS, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]


def test_npy_for_a_single_input(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((3, 4), np.float64))
    (batch,) = feeds(open_source(tmp_path / "c.npy", SPECS, batch_size=8))
    assert batch.dtype == np.float32  # float64 is cast within its kind


def test_directory_of_feeds_in_name_order(tmp_path):
    d = tmp_path / "feeds"
    d.mkdir()
    for k, rows in enumerate((1, 3, 2)):
        np.savez(d / f"{k:03d}.npz", x=np.full((rows, 4), k, np.float32))
    batches = feeds(open_source(d, SPECS, batch_size=8))
    assert [b.shape[0] for b in batches] == [1, 3, 2]
    assert [b[0, 0] for b in batches] == [0, 1, 2]


def test_iterable_and_calibration_data_reader():
    items = [{"x": np.zeros((2, 4), np.float32)} for _ in range(3)]
    assert len(feeds(open_source(iter(items), SPECS, batch_size=1))) == 3

    class Reader:
        def __init__(self):
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)

    source = open_source(Reader(), SPECS, batch_size=1)
    assert len(feeds(source)) == 3
    assert len(feeds(source)) == 3  # a one-shot reader is replayed from what it yielded


def test_holdout_split_by_sample(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.arange(40, dtype=np.float32).reshape(10, 4))
    calib, val = split(open_source(tmp_path / "c.npz", SPECS, batch_size=16), 0.2)
    c, v = np.concatenate(feeds(calib)), np.concatenate(feeds(val))
    assert len(c) == 8 and len(v) == 2
    assert not set(c[:, 0]) & set(v[:, 0])


@pytest.mark.parametrize("array, message", [
    (np.ones((2, 5), np.float32), "has 5 on axis 1"),
    (np.ones((2, 4, 1), np.float32), "rank 3"),
    (np.array([[np.nan] * 4], np.float32), "NaN"),
    (np.ones((2, 4), np.int64), "dtype int64"),
])
def test_bad_arrays_are_named(tmp_path, array, message):
    np.savez(tmp_path / "c.npz", x=array)
    with pytest.raises(DataError, match=message):
        feeds(open_source(tmp_path / "c.npz", SPECS, batch_size=4))


def test_pickled_content_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled"):
        feeds(open_source(tmp_path / "c.npy", SPECS, batch_size=4))


def test_zero_samples_and_missing_or_extra_inputs(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.ones((0, 4), np.float32))
    with pytest.raises(DataError, match="zero samples"):
        open_source(tmp_path / "empty.npz", SPECS, batch_size=4)
    np.savez(tmp_path / "extra.npz", x=np.ones((1, 4), np.float32), y=np.ones(1))
    with pytest.raises(DataError, match="'y' is not an input"):
        open_source(tmp_path / "extra.npz", SPECS, batch_size=4)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_float_widths_are_cast_with_one_warning(tmp_path, caplog, dtype):
    x = np.linspace(-1, 1, 40).reshape(10, 4).astype(dtype)
    np.savez(tmp_path / "c.npz", x=x)
    with caplog.at_level("WARNING", logger="onnxcompress"):
        calib, val = split(open_source(tmp_path / "c.npz", SPECS, batch_size=2), 0.2)
        got = np.concatenate(feeds(calib) + feeds(val))
    assert got.dtype == np.float32
    assert np.allclose(np.sort(got.ravel()), np.sort(x.astype(np.float32).ravel()))
    casts = [r.getMessage() for r in caplog.records if "cast to float32" in r.getMessage()]
    assert len(casts) == 1 and f"is {np.dtype(dtype)}" in casts[0]


def test_a_directory_of_float64_feeds_warns_once(tmp_path, caplog):
    for k in range(3):
        np.save(tmp_path / f"{k}.npy", np.ones((2, 4), np.float64))
    with caplog.at_level("WARNING", logger="onnxcompress"):
        source = open_source(tmp_path, SPECS, batch_size=2)
        assert all(b.dtype == np.float32 for b in feeds(source) + feeds(source))
    assert sum("cast to float32" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("array, message", [
    (np.ones((2, 4), np.int32), "dtype int32, the model takes float32"),
    (np.ones((2, 4), bool), "dtype bool, the model takes float32"),
])
def test_other_kinds_are_refused(tmp_path, array, message):
    np.savez(tmp_path / "c.npz", x=array)
    with pytest.raises(DataError, match=message):
        open_source(tmp_path / "c.npz", SPECS, batch_size=4)


def test_integers_out_of_range_are_refused():
    specs = [InputSpec("ids", np.dtype(np.int32), (None, 3))]
    ok = feeds_of(open_source({"ids": np.arange(6, dtype=np.int64).reshape(2, 3)}, specs, batch_size=2), "ids")
    assert ok[0].dtype == np.int32
    with pytest.raises(DataError, match="values outside int32"):
        open_source({"ids": np.full((2, 3), 2**40, np.int64)}, specs, batch_size=2)


def feeds_of(source, name):
    return [f[name] for f in source]


def test_a_missing_input_lists_what_the_data_holds(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 4), np.float32), mask=np.ones((2, 4), np.float32))
    with pytest.raises(DataError, match=r"missing input 'x' \(the model needs x; the data holds input_ids, mask\)"):
        open_source(tmp_path / "c.npz", SPECS, batch_size=4)


def test_a_rank_error_gives_the_file_shape_not_the_batch(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.ones((37, 4, 1), np.float32))
    with pytest.raises(DataError, match=r"rank 3 \(shape \(37, 4, 1\)\)"):
        open_source(tmp_path / "c.npz", SPECS, batch_size=4)
    np.savez(tmp_path / "d.npz", x=np.ones((37, 5), np.float32))
    with pytest.raises(DataError, match=r"has 5 on axis 1, the model takes 4 \(shape \(37, 5\)\)"):
        open_source(tmp_path / "d.npz", SPECS, batch_size=4)
