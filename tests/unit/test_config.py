from pathlib import Path

import pytest

from fedscan.common.config import AppConfig, RunConfig, load_run_config
from fedscan.common.errors import FedscanError


def test_defaults_are_valid() -> None:
    cfg = load_run_config()
    assert cfg.model == "unet" and cfg.strategy == "fedavg" and cfg.rounds >= 1


def test_unknown_model_names_field_and_allowed_values() -> None:
    with pytest.raises(FedscanError) as exc:
        load_run_config(overrides={"model": "resnet999"})
    msg = str(exc.value)
    assert "model (from --model)" in msg
    assert "unknown model 'resnet999'" in msg and "allowed: unet" in msg


def test_unknown_strategy() -> None:
    with pytest.raises(FedscanError, match=r"strategy .*allowed: fedavg"):
        load_run_config(overrides={"strategy": "fedmagic"})


def test_rounds_below_one() -> None:
    with pytest.raises(FedscanError) as exc:
        load_run_config(overrides={"rounds": 0})
    assert "rounds (from --rounds)" in str(exc.value)
    assert "greater than or equal to 1" in str(exc.value)


def test_image_size_must_be_multiple_of_16() -> None:
    with pytest.raises(FedscanError, match="image_size.*multiple of 16"):
        load_run_config(overrides={"image_size": 100})


def test_toml_file_then_cli_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('rounds = 7\nlocal-epochs = 3\nmodel = "UNET"\nseed = 5\n')
    cfg = load_run_config(f, {"rounds": 2, "seed": None})
    assert cfg.rounds == 2  # the flag wins
    assert cfg.local_epochs == 3 and cfg.seed == 5  # the file fills the rest
    assert cfg.model == "unet"  # names are case-insensitive


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("rounds = -1\nlearnig_rate = 0.1\n")
    with pytest.raises(FedscanError) as exc:
        load_run_config(f)
    msg = str(exc.value)
    assert f"rounds (from {f})" in msg
    assert "learnig_rate" in msg and "not a fedscan setting" in msg and "learning_rate" in msg


def test_malformed_and_missing_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(FedscanError, match="not valid TOML"):
        load_run_config(bad)
    with pytest.raises(FedscanError, match="config file not found"):
        load_run_config(tmp_path / "nope.toml")


def test_device_choices() -> None:
    with pytest.raises(FedscanError, match="device"):
        load_run_config(overrides={"device": "tpu"})


def test_app_config_round_trips_through_flower_run_config() -> None:
    cfg = AppConfig(run=RunConfig(rounds=4, data_root=Path("/data")), site_names=["a", "b"])
    back = AppConfig.from_run_config(cfg.to_run_config())
    assert back == cfg
    assert AppConfig.from_run_config({}) == AppConfig()


def test_flower_processes_run_offline(tmp_path: Path) -> None:
    from fedscan.common.flower_runtime import offline_env

    env = offline_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_task_picks_its_default_model_and_model_defaults() -> None:
    cfg = load_run_config(overrides={"task": "classification"})
    assert cfg.model == "mil"
    assert (cfg.image_size, cfg.batch_size, cfg.local_epochs) == (64, 2, 12)  # the exam model's defaults
    cfg = load_run_config(overrides={"task": "classification", "model": "resnet18", "local_epochs": 5})
    assert cfg.local_epochs == 5 and cfg.batch_size == 16  # a given value wins over the model default
    seg = load_run_config(overrides={"model": "segnet"})
    assert seg.task == "segmentation" and seg.segnet_width == 1.0 and seg.image_size == 96


def test_model_must_suit_the_task() -> None:
    with pytest.raises(FedscanError) as exc:
        load_run_config(overrides={"task": "classification", "model": "segnet"})
    assert "model 'segnet' does not do classification" in str(exc.value)
    assert "densenet121, resnet18, mil" in str(exc.value)
    with pytest.raises(FedscanError, match="does not do segmentation"):
        load_run_config(overrides={"task": "segmentation", "model": "mil"})


def test_segnet_needs_a_multiple_of_32() -> None:
    with pytest.raises(FedscanError, match="multiple of 32 for segnet"):
        load_run_config(overrides={"model": "segnet", "image_size": 80})
    assert load_run_config(overrides={"model": "unet", "image_size": 80, "unet_depth": 4}).image_size == 80


def test_model_alone_picks_its_task() -> None:
    cfg = load_run_config(overrides={"model": "resnet18"})
    assert cfg.task == "classification" and cfg.image_size == 64


def test_unet_too_deep_for_the_image() -> None:
    with pytest.raises(FedscanError, match="too small for a U-Net of depth 5.*at least 64"):
        load_run_config(overrides={"unet_depth": 5, "image_size": 32})


def test_flat_keys_go_into_the_groups_and_read_back_flat() -> None:
    from fedscan.common.config import GROUPS

    cfg = load_run_config(
        overrides={
            "image_size": 64,
            "strategy": "FedProx",
            "secagg_clipping_range": 4.0,
            "base_channels": 8,
            "rounds": 2,
        }
    )
    grouped = (cfg.data.image_size, cfg.aggregation.strategy, cfg.secure_aggregation.clipping_range)
    assert grouped == (64, "fedprox", 4.0)
    assert cfg.network.base_channels == cfg.base_channels == 8 and cfg.rounds == 2
    flat = cfg.to_toml_dict()
    assert not set(flat) & set(GROUPS)  # written configs stay flat, as before the groups
    assert flat["image_size"] == 64 and flat["strategy"] == "fedprox" and flat["secagg_clipping_range"] == 4.0
    assert RunConfig.model_validate(flat) == cfg


def test_a_group_table_in_toml_is_the_same_as_its_flat_keys(tmp_path: Path) -> None:
    flat, nested = tmp_path / "flat.toml", tmp_path / "nested.toml"
    flat.write_text('image_size = 64\nstrategy = "fedprox"\nsecagg = true\nsecagg-shares = 3\nsites = 4\n')
    nested.write_text(
        'sites = 4\n[data]\nimage_size = 64\n[aggregation]\nstrategy = "fedprox"\n'
        "[secure_aggregation]\nenabled = true\nshares = 3\n"
    )
    assert load_run_config(nested) == load_run_config(flat)
    assert load_run_config(nested, overrides={"image_size": 32}).data.image_size == 32  # the flag wins


def test_group_errors_name_the_flat_setting_and_where_it_came_from(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("[data]\nimage_size = 50\nimagesize = 3\n")
    with pytest.raises(FedscanError) as exc:
        load_run_config(f)
    msg = str(exc.value)
    assert f"image_size (from {f}): must be a multiple of 16" in msg
    assert "data.imagesize" in msg and "not a fedscan setting" in msg
    with pytest.raises(FedscanError, match="model .from --model.: unknown model 'vit'"):
        load_run_config(overrides={"model": "vit"})
    twice = tmp_path / "twice.toml"
    twice.write_text("image_size = 64\n[data]\nimage_size = 32\n")
    with pytest.raises(FedscanError, match="image_size is given twice"):
        load_run_config(twice)


def test_a_written_run_config_loads_back(tmp_path: Path) -> None:
    from fedscan.server.checkpoint import save_run_config

    cfg = load_run_config(
        overrides={
            "model": "mil",
            "secagg": True,
            "sites": 4,
            "quality_weighting": True,
            "data_root": str(tmp_path / "sites"),
            "pixel_spacing": 0.7,
        }
    )
    assert load_run_config(save_run_config(tmp_path, cfg)) == cfg


def test_copies_take_flat_names_and_leave_the_original() -> None:
    cfg = RunConfig()
    copy = cfg.model_copy(update={"data_root": Path("/elsewhere"), "rounds": 9, "strategy": "fedbn"})
    assert (copy.data.data_root, copy.rounds, copy.aggregation.strategy) == (Path("/elsewhere"), 9, "fedbn")
    assert (cfg.data_root, cfg.rounds, cfg.strategy) == (None, 3, "fedavg")
    with pytest.raises((AttributeError, ValueError)):
        cfg.image_size = 64  # type: ignore[misc]  (a grouped setting is set in its group)


def test_each_flat_name_is_typed_as_its_group_field() -> None:
    """The flat names are declared with a type for static checks: it must be the group field's."""
    import typing

    from fedscan.common.config import GROUPS, SETTINGS

    grouped = [name for name in SETTINGS if name not in RunConfig.model_fields]
    assert len(grouped) == sum(len(m.model_fields) for m in GROUPS.values())
    for name in grouped:
        flat = vars(RunConfig)[name]
        declared = typing.get_args(flat.__orig_class__)[0]
        assert declared == GROUPS[flat.group].model_fields[flat.field].annotation, name
