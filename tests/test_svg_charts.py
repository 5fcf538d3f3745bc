"""Run plots are SVG written without a plotting library: valid, complete, and readable."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from common.svg_charts import PALETTE, Bars, Line, nice_range, nice_ticks, write_bar_charts, write_line_chart

SVG = "{http://www.w3.org/2000/svg}"


def test_ticks_are_round_numbers_inside_the_range():
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 50, target=10) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert nice_ticks(3, 47) == [10, 20, 30, 40]
    assert nice_ticks(0.3, 0.9) == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert nice_range(-1.5, 99) == (-20, 100)


def test_line_chart_draws_every_line_marker_and_switch(tmp_path):
    path = tmp_path / "accuracy.svg"
    lines = [Line("task 0", [0, 1, 2, 3], [10, 80, 90, 85]), Line("task 1", [0, 1, 2, 3], [math.nan, 0, 50, 95])]
    write_line_chart(path, lines, title="t <&> x", x_label="round", y_label="acc", y_range=(0, 100),
                     dotted_xs=[1.5], markers=[2], marker_label="drift")
    root = ET.parse(path).getroot()  # well-formed, the title's <&> escaped
    polylines = root.findall(f"{SVG}polyline")
    assert len(polylines) == 2
    assert len(polylines[1].get("points").split()) == 3  # the NaN point is left out
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"t <&> x", "task 0", "task 1", "drift", "round", "acc"} <= set(texts)
    assert any(line.get("stroke-dasharray") for line in root.iter(f"{SVG}line"))


def test_bar_charts_draw_one_bar_per_label_and_handle_negative_values(tmp_path):
    path = tmp_path / "summary.svg"
    labels = ["naive", "replay", "fed-joint"]
    write_bar_charts(path, [Bars("ACC %", labels, [20, 91, 97], [1, 2, 0]),
                            Bars("forgetting pts", labels, [95, 8, -1], [1, 1, 0], PALETTE[3])], "bench")
    root = ET.parse(path).getroot()
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("fill") in (PALETTE[0], PALETTE[3])]
    assert len(bars) == 6 and all(float(r.get("height")) >= 0 for r in bars)
    assert [t.text for t in root.iter(f"{SVG}text")].count("replay") == 2


def test_charts_survive_values_that_are_not_finite_and_label_rounds_with_whole_numbers(tmp_path):
    lines = [Line("task 0", [0, 1, 2, 3], [10, math.inf, 90, 85])]
    write_line_chart(tmp_path / "a.svg", lines, title="t", x_label="round", y_label="acc", y_range=(0, 100))
    root = ET.parse(tmp_path / "a.svg").getroot()
    assert len(root.find(f"{SVG}polyline").get("points").split()) == 3
    assert all("inf" not in (t.text or "") for t in root.iter(f"{SVG}text"))
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("y") == "458.0"]  # the x axis
    assert ticks == ["0", "1", "2", "3"]
    write_bar_charts(tmp_path / "b.svg", [Bars("ACC %", ["a", "b"], [math.nan, math.inf], [0, math.nan])], "t")
    assert "nan" not in (tmp_path / "b.svg").read_text() and "inf" not in (tmp_path / "b.svg").read_text()
