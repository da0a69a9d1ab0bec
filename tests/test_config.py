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


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert cfg.loss.temperature == 0.1
    assert yaml.safe_load((REPO / "configs" / name).read_text())


def test_paper_settings():
    acdc = load_config(str(REPO / "configs" / "acdc_pcl.yaml"))
    chd = load_config(str(REPO / "configs" / "chd_pcl.yaml"))
    assert (acdc.loss.threshold, acdc.model.width, acdc.pretrain.batch_size, acdc.pretrain.lr) == (0.35, 48, 32, 0.1)
    assert (chd.loss.threshold, chd.model.width, chd.pretrain.batch_size, chd.pretrain.lr) == (0.1, 32, 32, 0.1)
    papers = {"acdc_pcl": (352, 48), "chd_pcl": (512, 32), "mmwhs_pcl": (256, 32), "hvsmr_pcl": (352, 48)}
    for name, (patch, width) in papers.items():
        cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
        assert (cfg.data.patch, cfg.model.width, cfg.data.folds, cfg.loss.temperature) == (patch, width, 5, 0.1), name
        assert cfg.sweep.pretrain == ["pcl", "gcl", "simclr"] and "random" in cfg.sweep.encoders, name
    transfer = load_config(str(REPO / "configs" / "transfer_chd_to_mmwhs.yaml"))
    assert transfer.model.width == chd.model.width and transfer.data.layout == "mmwhs"
    assert any(e.startswith("models:/chd-") for e in transfer.sweep.encoders)


# ---------------------------------------------------------------- validation at load

BAD_OVERRIDES = [
    # (override, the value as the message shows it, words of what is allowed)
    ("engine.strategy=ddpp", "'ddpp'", "ddp, deepspeed"),
    ("pretrain.batch_size=abc", "'abc'", "integer"),
    ("data.patch=-3", "-3", ">= 1"),
    ("data.patch=3.0", "3.0", "integer"),
    ("data.patch=true", "True", "integer"),
    ("data.augment_on=gpu", "'gpu'", "auto, workers, device"),
    ("engine.precision=fp16", "'fp16'", "auto, bf16, fp32"),
    ("engine.zero_stage=3", "3", "0, 1, 2"),
    ("loss.method=moco", "'moco'", "pcl, gcl, simclr"),
    ("data.layout=nnunet2", "'nnunet2'", "generic, images, acdc, chd, mmwhs, hvsmr, nnunet"),
    ("pretrain.optimizer=adam", "'adam'", "sgd, lars"),
    ("engine.backend=mpi", "'mpi'", "nccl, gloo"),
    ("pretrain.lr=-1", "-1", ">= 0"),
    ("pretrain.lr=.nan", "nan", "finite"),
    ("pretrain.momentum=1", "1", "< 1"),
    ("model.width=0", "0", ">= 1"),
    ("finetune.num_classes=0", "0", ">= 1"),
    ("loss.threshold=0", "0", "> 0 and <= 1"),
    ("loss.threshold=1.5", "1.5", "<= 1"),
    ("loss.temperature=0", "0", "> 0"),
    ("data.clip_percentiles=[99, 1]", "[99, 1]", "0 <= low < high <= 100"),
    ("data.clip_percentiles=[1, 99, 100]", "[1, 99, 100]", "two numbers"),
    ("data.hu_window=[100, -100]", "[100, -100]", "low < high"),
    ("data.target_spacing=[0, 1.5]", "[0, 1.5]", "null or two numbers"),
    ("engine.channels_last=maybe", "'maybe'", "true or false"),
    ("engine.compile=1", "1", "true or false"),
    ("finetune.train_volumes=dk01", "'dk01'", "list of strings"),
    ("pretrain.volumes=[a, [b]]", "['a', ['b']]", "list of strings"),
    ("tracking.run_name=null", "None", "string"),
    ("checkpoint.keep=1", "1", ">= 2"),
    ("engine.timeout_s=0", "0", ">= 1"),
    ("data.num_workers=-1", "-1", ">= 0"),
    ("seed=-1", "-1", ">= 0"),
]


def _error(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


@pytest.mark.parametrize("override, shown, allowed", BAD_OVERRIDES, ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override_fails_at_load(override, shown, allowed):
    key = override.split("=", 1)[0]
    message = _error(None, [override])
    assert f"{key}={shown}" in message
    assert allowed in message
    assert message.startswith("command line: ")


@pytest.mark.parametrize("override, shown, allowed", BAD_OVERRIDES[:14], ids=[b[0] for b in BAD_OVERRIDES[:14]])
def test_bad_value_in_yaml_file_fails_at_load(tmp_path, override, shown, allowed):
    key, raw = override.split("=", 1)
    path = tmp_path / "c.yaml"
    section, _, name = key.rpartition(".")
    path.write_text(f"{section}:\n  {name}: {raw}\n" if section else f"{name}: {raw}\n")
    message = _error(str(path))
    assert f"{key}={shown}" in message and allowed in message
    assert message.startswith(f"{path}: ")


def test_the_value_that_won_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  patch: -3\nengine:\n  strategy: ddp\n")
    assert load_config(str(path), ["data.patch=32"]).data.patch == 32  # the override fixes the file's value
    message = _error(str(path), ["data.patch=32", "engine.strategy=ddpp"])
    assert message.startswith("command line: engine.strategy='ddpp'")
    assert _error(str(path), ["data.patch=-5", "data.patch=16", "data.patch=-7"]).startswith("command line: data.patch=-7 ")
    path.write_text("engine:\n  strategy: ddpp\n")
    assert load_config(str(path), ["engine.strategy=deepspeed"]).engine.strategy == "deepspeed"
    path.write_text("engine: {strategy: ddpp}\n")  # a whole section given as a mapping
    assert _error(str(path)).startswith(f"{path}: engine.strategy='ddpp'")


def test_good_values_are_converted(tmp_path):
    cfg = load_config(None, [
        "pretrain.lr=1", "finetune.train_volumes=[1, 2]", "finetune.test_volumes=[007, 010]", "finetune.name=123",
        "tracking.run_name=2024", "finetune.encoder=1.10", "pretrain.weight_decay=1e-5", "data.hu_window=[-1e3, 1e3]",
        "data.clip_percentiles=[0, 100]", "data.target_spacing=[1, 1.5]", "pretrain.optimizer=LARS", "engine.backend=",
        "engine.zero_stage=2", "pretrain.volumes=null", "loss.threshold=1",
    ])
    assert cfg.pretrain.lr == 1.0 and type(cfg.pretrain.lr) is float
    assert cfg.finetune.train_volumes == ["1", "2"]
    assert cfg.finetune.test_volumes == ["007", "010"]  # spelled as written, not YAML 1.1 octal
    assert (cfg.finetune.name, cfg.tracking.run_name, cfg.finetune.encoder) == ("123", "2024", "1.10")
    assert cfg.pretrain.weight_decay == 1e-5 and type(cfg.pretrain.weight_decay) is float  # YAML reads 1e-5 as a string
    assert cfg.data.hu_window == [-1000.0, 1000.0] and cfg.data.clip_percentiles == [0.0, 100.0]
    assert cfg.data.target_spacing == [1.0, 1.5] and all(type(v) is float for v in cfg.data.target_spacing)
    assert cfg.pretrain.optimizer == "lars" and cfg.engine.backend == "" and cfg.engine.zero_stage == 2
    assert cfg.pretrain.volumes is None and cfg.loss.threshold == 1.0
    # Everything is a plain Python type again: the resolved config saves and loads back equal.
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_good_values_from_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  lr: 1\n  volumes: [1, 02]\nfinetune:\n  lr: 5e-5\n  name: 2024\n")
    cfg = load_config(str(path))
    assert cfg.pretrain.lr == 1.0 and type(cfg.pretrain.lr) is float
    assert cfg.pretrain.volumes == ["1", "02"]
    assert cfg.finetune.lr == 5e-5 and cfg.finetune.name == "2024"


def test_defaults_are_valid_and_unchanged():
    from pcl_hpc.config import Config, validate

    assert validate(Config()) == Config() == load_config()


def test_choices_match_the_code_that_uses_them():
    """The choices in config.py are written out (no heavy imports there); they must match the modules' own lists."""
    import dataclasses

    from pcl_hpc import losses, optim
    from pcl_hpc.config import DataConfig, EngineConfig, LossConfig, PretrainConfig
    from pcl_hpc.data import geometry, intensity, layouts, preprocess, pseudonym, store
    from pcl_hpc.engine import strategy

    def choices(cls, name):
        return set(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"])

    assert choices(DataConfig, "layout") == set(layouts.LAYOUTS) | {"nnunet"}  # nnunet: pcl_hpc.nnunet.ingest
    assert choices(DataConfig, "modality") == set(preprocess.MODALITIES)
    assert choices(DataConfig, "slice_axis") == set(geometry.ORIENTATIONS)
    assert choices(DataConfig, "intensity") == set(intensity.INTENSITIES)
    assert choices(DataConfig, "interpolation") == set(geometry.INTERPOLATIONS)
    assert choices(DataConfig, "compressor") == set(store.COMPRESSORS)
    assert choices(DataConfig, "id_scheme") == set(pseudonym.ID_SCHEMES)
    assert choices(LossConfig, "method") == set(losses.METHODS)
    assert choices(PretrainConfig, "optimizer") == set(optim.OPTIMIZERS)
    assert choices(EngineConfig, "strategy") == set(strategy.STRATEGIES)


def test_validation_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; from pcl_hpc.config import load_config; load_config('configs/demo.yaml', ['data.patch=32']); "
            "print(sorted(m for m in ('torch', 'numpy', 'SimpleITK', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
