"""Metric writers: metrics.jsonl contents (non-finite as null, appending), TensorBoard scalars, truncation on resume."""

import json
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2

from jaxft.metrics import MetricsWriter, truncate_metrics


def read_events(folder: Path) -> list[tuple[str, int, float]]:
    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            out.extend((v.tag, event.step, v.simple_value) for v in event.summary.value)
    return out


def test_writes_one_json_line_per_record(tmp_path):
    w = MetricsWriter(tmp_path)
    assert w.enabled and w.path == tmp_path / "metrics.jsonl"
    w.write({"step": 1, "loss": 0.5, "learning_rate": 0.001})
    w.write({"step": 2, "eval_loss": 0.25, "split": "test", "ok": True})
    assert w.path.read_text() == (
        '{"step": 1, "loss": 0.5, "learning_rate": 0.001}\n'
        '{"step": 2, "eval_loss": 0.25, "split": "test", "ok": true}\n'
    )
    w.close()


def test_lines_are_flushed_before_close(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"step": 3, "loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 3, "loss": 1.0}\n'
    w.close()


def test_non_finite_values_are_null(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"step": 4, "loss": float("nan"), "grad_norm": float("inf"), "x": float("-inf"), "lr": 0.1})
    w.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 4,
        "loss": None,
        "grad_norm": None,
        "x": None,
        "lr": 0.1,
    }
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_new_writer_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    w = MetricsWriter(tmp_path)
    w.write({"step": 2, "loss": 1.0})
    w.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'


def test_tensorboard_gets_finite_numeric_scalars(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"step": 1, "loss": 0.5, "split": "test", "grad_norm": float("nan"), "tokens": 12})
    w.write({"step": 2, "loss": 0.25})
    w.close()
    assert sorted(read_events(tmp_path / "tensorboard")) == [("loss", 1, 0.5), ("loss", 2, 0.25), ("tokens", 1, 12.0)]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def test_truncate_drops_records_after_the_step(tmp_path):
    lines = [
        '{"step": 1, "loss": 3.0}',
        '{"step": 2, "loss": 2.0}',
        '{"step": 2, "eval_loss": 2.5}',
        '{"step": 3, "loss": 1.0}',
        '{"step": 4, "loss": 0.5}',
    ]
    write_lines(tmp_path / "metrics.jsonl", lines)
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(f"{line}\n" for line in lines[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_truncate_drops_broken_lines(tmp_path):
    lines = [
        '{"step": 1, "loss": 3.0}',
        '{"loss": 2.0}',
        "[1, 2]",
        "null",
        "",
        '{"step": "2", "loss": 1.0}',
        '{"step": "two"}',
        '{"step": 3, "lo',
    ]
    write_lines(tmp_path / "metrics.jsonl", lines)
    truncate_metrics(tmp_path, 5)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n{"step": "2", "loss": 1.0}\n'


def test_truncate_to_zero_empties_the_file(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", ['{"step": 1}', '{"step": 2}'])
    truncate_metrics(tmp_path, 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_truncate_other_file_by_name(tmp_path):
    write_lines(tmp_path / "samples.jsonl", ['{"step": 2, "prompt": "a"}', '{"step": 4, "prompt": "a"}'])
    write_lines(tmp_path / "metrics.jsonl", ['{"step": 4}'])
    truncate_metrics(tmp_path, 3, "samples.jsonl")
    assert (tmp_path / "samples.jsonl").read_text() == '{"step": 2, "prompt": "a"}\n'
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4}\n'


def test_truncate_without_a_file_creates_none(tmp_path):
    truncate_metrics(tmp_path, 3)
    assert list(tmp_path.iterdir()) == []
