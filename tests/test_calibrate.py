"""Calibration: feeds of one shape run together, padded positions left out of the statistics
(attention mask), and the report saying where padding could not be left out."""
from __future__ import annotations

import numpy as np
import pytest

import graphs
from onnxcompress import Config, compress
from onnxcompress.core import data as data_mod
from onnxcompress.core.calibrate import ChannelGram, TokenCounts, calibrate, mask_input
from onnxcompress.core.graph import GraphIndex
from onnxcompress.api import shapes_at


def requests_of(model, feed) -> tuple[ChannelGram, TokenCounts]:
    """The FFN's hidden activations (the ID group's exit, [B, S, 24] or [B*S, 24]) and the token
    counts of the embedding."""
    g = GraphIndex(model, *shapes_at(model, feed))
    relu = next(n for n in model.graph.node if n.op_type == "Relu").output[0]
    return ChannelGram(relu, -1, 24), TokenCounts("input_ids", 40)


def source(model, spec, batch_size=16):
    return data_mod.open_source(spec, data_mod.input_specs(model), batch_size=batch_size)


def test_the_mask_input_is_found_by_name_type_and_rank():
    assert mask_input(graphs.masked_encoder()) == "attention_mask"
    assert mask_input(graphs.attention()) is None  # a float mask of rank 4 is an additive bias, not a mask


def test_padded_and_unpadded_calibration_give_the_same_statistics():
    model = graphs.masked_encoder()
    feeds = graphs.sentences(37)
    gram, counts = requests_of(model, feeds[0])
    plain = calibrate(model, [gram, counts], source(model, feeds))
    padded = calibrate(model, [gram, counts], source(model, graphs.padded(feeds), batch_size=8))
    real = sum(f["input_ids"].shape[1] for f in feeds)
    assert plain[gram].rows == padded[gram].rows == real
    np.testing.assert_allclose(padded[gram].gram, plain[gram].gram, rtol=1e-5, atol=1e-5 * np.abs(plain[gram].gram).max())
    np.testing.assert_allclose(padded[gram].sums, plain[gram].sums, rtol=1e-5, atol=1e-5 * np.abs(plain[gram].sums).max())
    np.testing.assert_array_equal(padded[counts], plain[counts])  # token 0 (padding) is not counted
    longest = max(f["input_ids"].shape[1] for f in feeds)
    assert padded.padding == {"mask": "attention_mask", "positions": 37 * longest, "padded": 37 * longest - real,
                              "excluded": sorted([gram.tensor, "input_ids"]), "counted": []}
    assert plain.padding["padded"] == 0 and plain.padding["excluded"] == []


def test_without_masking_the_padding_would_have_diluted_the_statistics():
    """The test above can fail: the padded rows are real rows of the tensor, so counting them
    changes the Gram (guards against a model whose padded rows happen to vanish)."""
    model = graphs.masked_encoder()
    feeds = graphs.sentences(12)
    gram, _ = requests_of(model, feeds[0])
    arrays = graphs.padded(feeds)
    blind = {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"] * 0 + 1}
    plain = calibrate(model, [gram], source(model, feeds))
    counted = calibrate(model, [gram], source(model, blind))
    assert counted[gram].rows > plain[gram].rows
    assert not np.allclose(counted[gram].gram, plain[gram].gram, rtol=1e-3)


def test_padding_that_cannot_be_masked_is_counted_and_reported(tmp_path):
    model = graphs.masked_encoder(flat=True)   # the FFN sees [B*S, width]: the mask does not apply
    feeds = graphs.sentences(20)
    gram, counts = requests_of(model, feeds[0])
    stats = calibrate(model, [gram, counts], source(model, graphs.padded(feeds)))
    assert stats.padding["counted"] == [gram.tensor] and stats.padding["excluded"] == ["input_ids"]
    assert stats[gram].rows == stats.padding["positions"]   # every position, padded or not
    path = tmp_path / "m.onnx"
    import onnx
    onnx.save(model, str(path))
    np.savez(tmp_path / "pad.npz", **graphs.padded(feeds))
    report = compress(path, tmp_path / "o.onnx", config=Config(keep=0.5), calib=tmp_path / "pad.npz")
    assert report.data["padding"]["counted"] == [gram.tensor]
    assert any("padded positions" in w and "counted" in w for w in report.warnings)


def test_padded_npz_and_a_folder_of_sentences_keep_the_same_channels(tmp_path):
    import onnx
    model = graphs.masked_encoder()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = graphs.sentences(60)
    folder = tmp_path / "calib"
    folder.mkdir()
    for k, f in enumerate(feeds):
        np.savez(folder / f"{k:03d}.npz", **f)
    np.savez(tmp_path / "pad.npz", **graphs.padded(feeds))
    reports = [compress(path, tmp_path / f"o{k}.onnx", config=Config(keep=0.5), calib=spec)
               for k, spec in enumerate((folder, tmp_path / "pad.npz"))]
    keeps = [[e.keep for e in r.plan.entries] for r in reports]
    assert keeps[0] == keeps[1]
    assert reports[0].groups[0]["error"] == pytest.approx(reports[1].groups[0]["error"], rel=1e-4)
    assert reports[1].data["padding"]["padded"] > 0 and reports[1].data["padding"]["counted"] == []
    assert not [w for w in reports[1].warnings if "padded" in w]
    # validation on the held-out fifth leaves the padded positions out too: the same agreement
    folder_agreement, padded_agreement = (r.agreement[0] for r in reports)
    assert padded_agreement["samples"] == folder_agreement["samples"] == 12
    for key in ("rel_l2", "cosine", "max_abs"):
        assert padded_agreement[key] == pytest.approx(folder_agreement[key], rel=1e-4), key


def test_feeds_of_one_shape_run_together_with_the_same_statistics():
    """A folder of sentences: feeds of equal length are merged into one call (up to the batch)
    and split back per feed, so merging changes nothing but round-off; with feeds of a single
    shape (run in order) even the rows `max_rows` draws are the same."""
    model = graphs.masked_encoder()
    mixed, same = graphs.sentences(40, lengths=(5, 8)), graphs.sentences(40, lengths=(6, 7))
    gram, counts = requests_of(model, mixed[0])
    for feeds, max_rows in ((mixed, 0), (same, 0), (same, 3)):
        one = calibrate(model, [gram, counts], feeds, batch=1, max_rows=max_rows, seed=4)
        merged = calibrate(model, [gram, counts], feeds, batch=16, max_rows=max_rows, seed=4)
        assert merged[gram].rows == one[gram].rows
        np.testing.assert_allclose(merged[gram].gram, one[gram].gram, rtol=1e-5, atol=1e-6 * np.abs(one[gram].gram).max())
        np.testing.assert_array_equal(merged[counts], one[counts])
    assert one[gram].rows == 3 * len(same)  # the cap applied per feed, not per merged call


def test_merged_calls_are_fewer(monkeypatch):
    from onnxcompress.core import calibrate as calibrate_mod
    model = graphs.masked_encoder()
    feeds = graphs.sentences(40, lengths=(5, 8))   # three lengths
    gram, _ = requests_of(model, feeds[0])
    seen = []
    real = calibrate_mod.make_session

    def spy(*args, **kwargs):
        session = real(*args, **kwargs)

        class Spy:
            def run(self, names, feed):
                seen.append(feed["input_ids"].shape[0])
                return session.run(names, feed)
        return Spy()

    monkeypatch.setattr(calibrate_mod, "make_session", spy)
    calibrate(model, [gram], feeds, batch=16)
    assert sum(seen) == 40 and len(seen) <= 3 + 40 // 16 + 1
    assert max(seen) > 1


def test_sensitivity_probes_leave_padded_positions_out():
    """A probe whose outputs differ from the original's only at padded positions has no error."""
    from onnxcompress.sensitivity import output_error, reference_outputs
    model = graphs.masked_encoder()
    feed = graphs.padded(graphs.sentences(6))
    names = [o.name for o in model.graph.output]
    ref = reference_outputs(model, [feed], names)
    moved = [[r.copy() for r in ref[0]]]
    moved[0][0][feed["attention_mask"] == 0] += 5.0   # only where the mask is 0
    assert output_error(model, [feed], names, moved, "attention_mask") == pytest.approx(0.0, abs=1e-12)
    assert output_error(model, [feed], names, moved) > 1e-3
