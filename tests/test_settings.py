"""Settings from any boundary (flags, run config, config.json, a server's message to a client)
are typed and checked once: a bad value is refused with a FedtideError naming the setting."""

from __future__ import annotations

import json
import random

import pytest

from common.config import ClientSettings, RunConfig, all_settings
from common.errors import FedtideError

HOSTILE = [float("nan"), float("inf"), -float("inf"), "x", "", None, [1, 2], {"a": 1}, b"\x00", 10**400, -1, 1e308]


def test_every_setting_refuses_non_finite_and_wrongly_typed_values_with_its_name():
    for name, setting in all_settings().items():
        for value in (float("nan"), float("inf"), [1], {"k": 1}):
            if setting.kind is str and not isinstance(value, (list, dict)):
                continue  # any text is a string; its section checks what it means
            try:
                RunConfig.from_mapping({name: value})
            except FedtideError as err:
                assert name in str(err) or "method" in str(err), (name, value, str(err))
            else:
                raise AssertionError(f"{name} accepted {value!r}")


def test_fuzzed_client_settings_are_refused_with_a_fedtide_error_never_a_crash():
    """What a server sends a client is untrusted: every fuzzed record parses or is refused cleanly."""
    rng = random.Random(0)
    names = [n for n in ClientSettings().to_mapping()]
    for _ in range(400):
        record = ClientSettings().to_mapping()
        for name in rng.sample(names, rng.randint(1, 4)):
            record[name] = rng.choice(HOSTILE)
        try:
            parsed = ClientSettings.from_mapping(record)
        except FedtideError:
            continue
        for value in parsed.to_mapping().values():
            assert not isinstance(value, float) or value == value and abs(value) != float("inf")


def test_settings_survive_the_flat_boundary_and_old_run_folders_still_load(tmp_path):
    config = RunConfig.of(method="der+lwf", memory_size=64, der_alpha=0.3, strategy="fedavgm", server_lr=0.5,
                          aggregation="clip", clip_norm=2.0, async_spread=2, drift_weight=2.0)
    assert RunConfig.from_mapping(json.loads(json.dumps(config.to_mapping()))) == config
    old = {k: v for k, v in RunConfig().to_mapping().items() if k not in ("server-lr", "memory-size")}
    assert RunConfig.from_mapping(old) == RunConfig()  # a config.json written before these keys existed
    assert RunConfig.from_mapping({"memory-size": 0, "server-lr": 0.0}, toml=True) == RunConfig()  # TOML's "default"
    with pytest.raises(FedtideError, match="--memory-size must be a positive integer"):
        RunConfig.from_mapping({"memory-size": 0})  # elsewhere 0 is no memory size
    with pytest.raises(FedtideError, match="unknown setting 'memory_sise'|unknown setting 'memory-sise'"):
        RunConfig.from_mapping({"memory_sise": 10})


def test_a_drift_responses_epoch_boost_is_bounded_on_the_client():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from client.app import received_settings
    from fedtide.runtimes.inprocess import InProcessGrid

    InProcessGrid(None, [])  # the run identity a Message needs
    settings = ClientSettings()

    def message(boost):
        record = ConfigRecord({**settings.to_mapping(), "server-round": 3, "settings-hash": settings.digest(),
                               "epoch-boost": boost})
        return Message(content=RecordDict({"arrays": ArrayRecord(), "config": record}), dst_node_id=1,
                       message_type=MessageType.TRAIN)

    boosted, server_round = received_settings(message(2))
    assert server_round == 3 and boosted.learner.local_epochs == 2 * settings.learner.local_epochs
    assert received_settings(message(1))[0] == settings  # the boost is this round's, not cached
    for bad in (0, 10**6, 1.5, float("nan")):
        with pytest.raises(FedtideError, match="epoch-boost"):
            received_settings(message(bad))
