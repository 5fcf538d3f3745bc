"""Prometheus metrics of a live run: scraped over HTTP while rounds go on, parsed with
prometheus-client's own parser."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import RunConfig
from common.errors import FedtideError
from fedtide.runtimes.inprocess import run_inprocess
from loopback import free_port
from server.history import RoundRecord
from server.prometheus_metrics import PrometheusMetrics


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_round_updates_the_gauges_and_counters_an_operator_scrapes():
    with PrometheusMetrics("127.0.0.1:0", num_tasks=2) as metrics:
        record = RoundRecord(server_round=3, task=1, task_accuracies=[0.8, 0.6], seconds=1.5,
                             clients=[{"num-examples": 5, "drift-detected": 1}, {"num-examples": 5}],
                             rejected=[{"reason": "nan"}], release={"released": 2}, epsilon=3.25)
        metrics.round_done(record, connected=4)
        metrics.round_done(record, connected=4)
        scraped = _scrape(metrics.port)
    assert scraped[("fedtide_round", ())] == 3
    assert scraped[("fedtide_task_accuracy", (("task", "1"),))] == pytest.approx(0.6)
    assert scraped[("fedtide_accuracy_seen_tasks", ())] == pytest.approx(0.7)
    assert scraped[("fedtide_nodes", (("state", "connected"),))] == 4
    assert scraped[("fedtide_replies_total", (("outcome", "rejected"),))] == 2
    assert scraped[("fedtide_drift_events_total", ())] == 2
    assert scraped[("fedtide_released_version", ())] == 2
    assert scraped[("fedtide_round_duration_seconds", ())] == 1.5
    assert scraped[("fedtide_privacy_epsilon", ())] == 3.25


def test_a_simulation_serves_its_metrics_while_it_runs_and_a_taken_port_stops_it_early(tmp_path):
    port = free_port()
    config = RunConfig.of(num_tasks=2, rounds_per_task=3, hidden="16", quiet=True, out=str(tmp_path / "run"),
                          metrics_address=f"127.0.0.1:{port}")
    seen: list[float] = []

    def scrape_while_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(seen) < 50:
            try:
                seen.append(_scrape(port)[("fedtide_round", ())])
            except OSError:
                pass
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape_while_running, daemon=True)
    scraper.start()
    run_inprocess(config, threads=1)
    scraper.join(timeout=1)
    assert seen and max(seen) >= 1  # scraped mid-run
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)  # closed with the run
    with PrometheusMetrics(f"127.0.0.1:{port}", num_tasks=1):
        with pytest.raises(FedtideError, match="cannot listen there"):
            run_inprocess(config.replace(out=str(tmp_path / "other")), threads=1)
    with pytest.raises(FedtideError, match="give HOST:PORT"):
        PrometheusMetrics("nowhere", num_tasks=1)
