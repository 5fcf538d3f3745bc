"""Client-level differential privacy (--dp client): one client's influence is bounded, the
budget is Opacus's, a run stops at its target epsilon, and what cannot work is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from common.config import RunConfig
from common.errors import FedtideError
from fedtide.cli import main
from fedtide.runtimes.inprocess import run_inprocess
from server.privacy import ClientLevelDP


def _replies(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [{"w": rng.normal(size=(8, 4)).astype(np.float32), "steps": np.array(3)} for _ in range(n)]


def test_one_client_moves_the_private_mean_by_at_most_its_clipped_share():
    rng = np.random.default_rng(0)
    reference = {"w": np.zeros((8, 4), np.float32), "steps": np.array(3)}
    replies = _replies(rng, 10)
    hostile = [*replies[:9], {"w": np.full((8, 4), 1e6, np.float32), "steps": np.array(3)}]
    honest_dp, hostile_dp = (ClientLevelDP(clip=0.5, noise=1.0, delta=1e-5, clients=100, seed=1) for _ in range(2))
    unseeded = ClientLevelDP(clip=0.5, noise=1.0, delta=1e-5, clients=100)  # the default: no one can recompute it
    assert not np.array_equal(unseeded.aggregate(7, replies, reference, 10)["w"],
                              unseeded.aggregate(7, replies, reference, 10)["w"])
    honest = honest_dp.aggregate(7, replies, reference, sampled=10)
    attacked = hostile_dp.aggregate(7, hostile, reference, sampled=10)  # same round, same noise
    moved = np.linalg.norm(attacked["w"].astype(np.float64) - honest["w"])
    assert moved <= 2 * 0.5 / 10 + 1e-9  # two clipped updates apart, over the expected 10 replies
    assert attacked["steps"] == 3 and hostile_dp.clipped >= 1


def test_the_budget_is_opacus_rdp_accountants_at_the_sampling_rate():
    dp = ClientLevelDP(clip=1.0, noise=1.1, delta=1e-5, clients=1000)
    reference = {"w": np.zeros(3, np.float32)}
    for round_ in range(1, 21):
        dp.aggregate(round_, [{"w": np.ones(3, np.float32)}], reference, sampled=100)
    accountant = RDPAccountant()
    for _ in range(20):
        accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    assert dp.epsilon() == pytest.approx(accountant.get_epsilon(1e-5))
    dp.target_epsilon = dp.epsilon() + 1e-6
    assert dp.next_round_exceeds(0.1) and not ClientLevelDP(1.0, 1.1, 1e-5, 1000).next_round_exceeds(0.1)


def test_a_private_run_reports_its_budget_every_round_and_stops_at_its_target(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--out", str(out), "--num-tasks", "1", "--rounds-per-task", "20", "--clients", "10",
                 "--dp", "client", "--dp-noise", "1.0", "--target-epsilon", "8", "--threads", "1"])
    assert code == 0
    err = capsys.readouterr().err
    assert "1 client(s) a round" not in err and "10 client(s) a round" in err  # the few-clients warning
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 8 < ClientLevelDP(1.0, 1.0, 1e-5, 10, steps=[(1.0, 1.0)] * (len(rounds) + 1)).epsilon()
    assert summary["stopped_at_round"] == len(rounds) < 20
    assert summary["dp"]["epsilon"] == pytest.approx(epsilons[-1]) and "Poisson" in summary["dp"]["sampling"]


def test_private_and_compressed_updates_compose(tmp_path):
    config = RunConfig.of(num_tasks=1, rounds_per_task=2, clients=10, quiet=True, dp="client", compress="int8",
                          out=str(tmp_path / "run"))
    summary = run_inprocess(config, threads=1)
    assert summary["rejected_replies"] == 0 and summary["dp"]["rounds"] == 2  # unpacked, then clipped and noised
    assert summary["uplink_bytes_per_client_round"] < summary["downlink_bytes_per_client_round"] / 3


@pytest.mark.parametrize("settings, flag", [
    ({"aggregation": "median"}, "--aggregation median"),
    ({"aggregation": "trimmed-mean"}, "--aggregation trimmed-mean"),
    ({"aggregation": "multikrum", "clients": 10}, "--aggregation multikrum"),
    ({"training": "clustered", "scenario": "distributed-drift", "num_tasks": 2}, "--training clustered"),
    ({"buffer_size": 1}, "--buffer-size"),
    ({"drift_weight": 2.0}, "--drift-weight"),
])
def test_what_client_level_dp_cannot_go_with_is_refused_in_one_line(settings, flag):
    with pytest.raises(FedtideError, match=flag):
        RunConfig.of(dp="client", **settings)
