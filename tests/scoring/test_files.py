"""score_file: a file scored in batches (state carried, row groups written as they come) equals
the file scored whole in memory; a corrupt row halfway fails with its row number and leaves no
output file."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from omegaconf import OmegaConf

from tsssm.commands.score import load_file
from tsssm.data.io import ReadSpec
from tsssm.errors import DataError
from tsssm.scoring.files import LONGEST_INTERVALS, score_file
from tsssm.scoring.scorer import Scorer
from tsssm.tasks.evaluate import predict_stream

from .conftest import make_bundle, stream


def write_stream(tmp_path, rows=3000, suffix=".parquet", seed=0, labels=True):
    raw = stream(rows, nan_frac=0.01, gap=(1000, 1020), seed=seed)
    ticks = np.arange(rows, dtype=np.int64) * 10
    ticks[2000:] += 70  # a gap in time: 7 rows missing
    frame = pl.DataFrame({"ts": ticks, "a": raw[:, 0], "b": raw[:, 1], "c": raw[:, 2]})
    if labels:
        frame = frame.with_columns(label=(np.arange(rows) % 97 == 0).astype(np.int64))
    path = tmp_path / f"s{suffix}"
    frame.write_csv(path) if suffix == ".csv" else frame.write_parquet(path)
    return path


def data_cfg(path, gaps="keep"):
    return OmegaConf.create(dict(
        path=str(path), time_column="ts", channels=[], label_column="label", ignore_columns=[],
        separator=",", time_format=None, gaps=gaps, gap_factor=3.0, fill="none",
        duplicates="error", sort=False))


SPEC = ReadSpec(time_column="ts", channels=("a", "b", "c"), label_column="label")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("gaps", ["keep", "mask"])
@pytest.mark.parametrize("batch_rows", [97, 1024])
def test_streamed_file_equals_whole_file(tmp_path, family, suffix, gaps, batch_rows):
    bundle = make_bundle(family, per_stream=True, train_rows=400)
    path = write_stream(tmp_path, suffix=suffix)
    data = load_file(data_cfg(path, gaps), bundle)  # the in-memory path of tsssm score
    part = data.parts[0]
    pred = predict_stream(bundle.model, part.stream.values, bundle.score_kind)
    flags = bundle.threshold.flags(pred.score)

    out = tmp_path / "out" / "scores.parquet"
    result = score_file(path, Scorer(bundle), SPEC, out, gaps=gaps, batch_rows=batch_rows,
                        progress=False)
    got = pl.read_parquet(out)
    contrib = [f"contrib:{c}" for c in bundle.channels]
    assert got.columns == ["stream", "time", "score", "flag", "label", *contrib]
    assert got.height == len(part.stream) == result.rows == 3000 + (7 if gaps == "mask" else 0)
    np.testing.assert_array_equal(got["time"].to_numpy(), part.stream.time)
    np.testing.assert_array_equal(got["label"].to_numpy(), part.stream.labels)
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(got["score"].to_numpy(), pred.score, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.select(contrib).to_numpy(), pred.contrib, rtol=tol, atol=tol)
    clear = np.abs(pred.score - bundle.threshold.value) > 1e-3
    assert (got["flag"].to_numpy()[clear] == flags[clear]).all()
    assert set(got["stream"].unique()) == {"s"}
    assert result.counts["tp"] + result.counts["fn"] == int(part.stream.labels.sum())
    from tsssm.anomaly.metrics import anomaly_metrics
    from tsssm.scoring.files import detection_summary

    want = anomaly_metrics(part.stream.labels, got["flag"].to_numpy(), pred.score)
    summary = detection_summary([result])
    for key in ("f1", "far", "mar", "tp", "fp", "n_positive"):
        assert summary[key] == pytest.approx(want[key])
    assert summary["auc_pr"] == pytest.approx(want["auc_pr"], abs=1e-3)
    assert (result.gap_note is not None) == True  # noqa: E712 - the time gap is reported
    assert not list(out.parent.glob(".*tmp"))


@pytest.mark.parametrize("family", ["kalman", "mamba"])
@pytest.mark.parametrize("batch_rows", [29, 1000])
def test_default_anomaly_task_streams_with_intervals(tmp_path, family, batch_rows):
    """The default anomaly task (Mahalanobis, 30-row shift window) with per-stream thresholds:
    the scores, contributions and flagged intervals of the streamed file equal `tsssm score`'s
    in-memory path (stream_frame / interval_frame), with batches of 29 rows splitting windows,
    the gap and the flagged runs."""
    from tsssm.commands.common import interval_frame, stream_frame
    from tsssm.commands.score import stream_threshold
    from tsssm.scoring.files import intervals_output
    from tsssm.tasks.evaluate import StreamPrediction

    from .conftest import ANOMALY

    bundle = make_bundle(family, score=ANOMALY, scope="per_stream", train_rows=400)
    path = write_stream(tmp_path, rows=1500)
    data = load_file(data_cfg(path), bundle)
    part = data.parts[0]
    pred = predict_stream(bundle.model, part.stream.values, ANOMALY)
    threshold = stream_threshold(bundle, pred.score, 400, "s")
    out = tmp_path / "out" / "scores.parquet"
    result = score_file(path, Scorer(bundle), SPEC, out, batch_rows=batch_rows, progress=False)
    got = pl.read_parquet(out)
    # the in-memory frames, flagged as the streamed file is (flags at rounding ties aside)
    flags = got["flag"].to_numpy()
    clear = np.abs(pred.score - threshold.value) > 1e-3
    assert (flags[clear] == threshold.flags(pred.score)[clear]).all()
    want = stream_frame(part, pred, flags, (0, len(flags)), threshold)
    assert got.columns == want.columns  # the per-stream threshold in force is a column
    tol = 1e-5 if family == "kalman" else 1e-4
    for column in [c for c in got.columns if c.startswith(("score", "threshold", "contrib:"))]:
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=tol,
                                   atol=tol)
    streamed = StreamPrediction(pred.mean, pred.var, got["score"].to_numpy().astype(float),
                                got.select([c for c in got.columns
                                            if c.startswith("contrib:")]).to_numpy())
    want_iv = interval_frame(part, streamed, flags, (0, len(flags)))
    got_iv = pl.read_parquet(intervals_output(out))
    assert want_iv.height > 1 and result.intervals == want_iv.height
    assert got_iv.columns == want_iv.columns
    for column in ("stream", "start", "end", "rows", "top"):
        assert got_iv[column].to_list() == want_iv[column].to_list()
    np.testing.assert_allclose(got_iv.select(want_iv.columns[4:5] + want_iv.columns[6:])
                               .to_numpy(), want_iv.select(want_iv.columns[4:5] +
                                                           want_iv.columns[6:]).to_numpy(),
                               rtol=1e-5)
    assert "refitted on this stream's first 400" in result.threshold_note
    assert result.longest[0]["rows"] == want_iv["rows"].max()
    # the longest intervals kept for printing: longest first, the earlier one first at a tie
    top = want_iv.sort(["rows", "start"], descending=[True, False]).head(LONGEST_INTERVALS)
    assert [(r["rows"], r["start"]) for r in result.longest] == list(zip(top["rows"],
                                                                         top["start"]))


def test_a_corrupt_row_halfway_fails_and_leaves_no_file(tmp_path):
    lines = ["ts,a,b,c"] + [f"{i},{i % 7},{i % 5},{i % 3}" for i in range(20_000)]
    lines[12_345] = "12344,1,not-a-number,3"
    path = tmp_path / "long.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "scores.parquet"
    with pytest.raises(DataError) as err:
        score_file(path, Scorer(make_bundle("kalman")), SPEC, out, batch_rows=1000,
                   progress=False)
    assert str(err.value) == (f"{path}: column 'b' is not numeric (row 12345 holds "
                              "'not-a-number'); fix the file or leave the column out of "
                              "data.channels")
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor a temporary


def test_an_existing_output_survives_a_failed_run(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("ts,a,b,c\n1,1,2,3\n1,1,2,3\n")
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"previous result")
    with pytest.raises(DataError, match="duplicate timestamp"):
        score_file(path, Scorer(make_bundle("kalman")), SPEC, out, progress=False)
    assert out.read_bytes() == b"previous result"


def test_progress_bar_from_ten_thousand_rows(tmp_path, capsys):
    bundle = make_bundle("kalman")
    small = write_stream(tmp_path, rows=5000, labels=False)
    score_file(small, Scorer(bundle), SPEC, tmp_path / "a.parquet", batch_rows=1000)
    assert "rows/s" not in capsys.readouterr().err
    big = write_stream(tmp_path, rows=12_000, suffix=".csv", labels=False)
    score_file(big, Scorer(bundle), SPEC, tmp_path / "b.parquet", batch_rows=1000)
    err = capsys.readouterr().err
    assert "scoring s" in err and "rows/s" in err


def test_unwritable_output_fails_before_scoring(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = write_stream(tmp_path, rows=100, labels=False)
    with pytest.raises(DataError, match="cannot create the folder of .*a-file/s.parquet"):
        score_file(path, Scorer(make_bundle("kalman")), SPEC, tmp_path / "a-file" / "s.parquet",
                   progress=False)


def test_a_reading_that_overflows_once_scaled_fails_as_in_memory(tmp_path):
    bundle = make_bundle("kalman")
    bundle.scaler.std[1] = 0.01  # a quiet channel in training: 3e38 / 0.01 overflows
    path = write_stream(tmp_path, rows=2000, suffix=".csv", labels=False)
    text = path.read_text().splitlines()
    cells = text[1500].split(",")
    cells[2] = "3e38"  # row 1500 of the file, channel b
    text[1500] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    c = data_cfg(path)
    c.label_column = None
    with pytest.raises(DataError) as whole:
        load_file(c, bundle)
    with pytest.raises(DataError) as streamed:
        score_file(path, Scorer(bundle), ReadSpec(time_column="ts", channels=("a", "b", "c")),
                   tmp_path / "o.parquet", batch_rows=256, progress=False)
    assert str(streamed.value) == str(whole.value)
    assert "row 1500" in str(whole.value)


def test_models_with_inputs_or_time_steps_are_read_whole():
    """A model that takes inputs or real time steps is not streamed (yet): score reads its file
    whole, and refuses live or many-file scoring for it; windowed, joint scores and per-stream
    thresholds stream."""
    from types import SimpleNamespace

    from tsssm.commands.score import streams_in_batches

    bundle = make_bundle("kalman")
    keep, time = OmegaConf.create({"gaps": "keep"}), OmegaConf.create({"gaps": "time"})
    assert streams_in_batches(keep, bundle)
    from .conftest import ANOMALY

    assert streams_in_batches(keep, make_bundle("kalman", score=ANOMALY, scope="per_stream"))
    assert not streams_in_batches(time, bundle)
    assert not streams_in_batches(keep, SimpleNamespace(inputs=["u"], model=bundle.model))
    exog_model = SimpleNamespace(uses_exog=("dt",))
    assert not streams_in_batches(keep, SimpleNamespace(inputs=[], model=exog_model))
