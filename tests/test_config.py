from pathlib import Path

import pytest
import yaml

from pcl_hpc.config import ConfigError, flatten, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  patch: 96\nloss:\n  method: gcl\n")
    cfg = load_config(str(path), ["data.patch=128", "pretrain.volumes=[a, b]", "loss.threshold=0.35"])
    assert cfg.data.patch == 128 and cfg.loss.method == "gcl"
    assert cfg.pretrain.volumes == ["a", "b"] and cfg.loss.threshold == 0.35


def test_unknown_key_lists_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  pach: 96\n")
    with pytest.raises(ConfigError, match=r"data\.pach.*valid keys there: raw_dir"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="unknown key 'optim.lr'"):
        load_config(None, ["optim.lr=1"])


def test_missing_file_named():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["model.width=8"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert flatten(again)["model.width"] == 8


@pytest.mark.parametrize("name", ["demo.yaml", "acdc_pcl.yaml", "chd_pcl.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert cfg.loss.temperature == 0.1
    assert yaml.safe_load((REPO / "configs" / name).read_text())


def test_paper_settings():
    acdc = load_config(str(REPO / "configs" / "acdc_pcl.yaml"))
    chd = load_config(str(REPO / "configs" / "chd_pcl.yaml"))
    assert (acdc.loss.threshold, acdc.model.width, acdc.pretrain.batch_size, acdc.pretrain.lr) == (0.35, 48, 32, 0.1)
    assert (chd.loss.threshold, chd.model.width, chd.pretrain.batch_size, chd.pretrain.lr) == (0.1, 32, 32, 0.1)
