"""The experiment config: YAML files, dotted overrides and errors that name their keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from optim import ConfigError, LARSConfig
from ssl_toolkit.config import CONFIG_DIR, ExperimentConfig, apply_overrides, load_config

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIG_DIR)) for p in SHIPPED])
def test_every_shipped_config_validates(path: Path) -> None:
    """Every shipped config loads; a LARS one keeps norms and biases out of adaptation (by
    module type and name, or as the authors' 1-d filter), except SwAV's LARC, which adapts
    every parameter (SwAV's recipes, and the digits DINO that borrows it); only ViTs take
    AdamW, and only DINO's ResNet recipes plain SGD."""
    cfg = load_config(str(path))
    # A run directory's config.yaml is the resolved config: it must load back as it was.
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    if isinstance(cfg.optim, LARSConfig):
        larc = cfg.method.name in ("swav", "dino")
        expected = ([],) if larc else (["@norm", "@bias"], ["@1d"])
        assert cfg.optim.exclude_from_layer_adaptation in expected
    elif cfg.optim.name == "sgd":
        assert cfg.method.name == "dino" and cfg.optim.clip_grad is not None
    else:
        assert cfg.optim.name == "adamw" and "vit" in cfg.model.backbone


def test_bare_names_are_looked_up_in_configs() -> None:
    assert load_config("simclr_lars").method.name == "simclr"
    assert load_config("simclr_lars.yaml").method.name == "simclr"
    assert load_config("byol_lars").method.name == "byol"


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        "simclr_lars",
        [
            "optim.lr=0.5",
            "optim.exclude_from_layer_adaptation=[@norm]",
            "trainer.max_steps=7",
            "optim.exclude_from_weight_decay=[@norm,@bias]",
            "logging.wandb.tags=[a, b]",
            "optim.trust_clip=true",
        ],
    )
    assert cfg.optim.lr == 0.5
    assert cfg.optim.exclude_from_layer_adaptation == ["@norm"]
    assert cfg.optim.exclude_from_weight_decay == ["@norm", "@bias"]
    assert cfg.trainer.max_steps == 7
    assert cfg.logging.wandb.tags == ["a", "b"]
    assert cfg.optim.trust_clip is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=-1", "optim.lr: Input should be greater than or equal to 0 (got -1)"),
        ("trainer.precision=fp8", "trainer.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ("trainer.epochs=many", "trainer.epochs: Input should be a valid integer"),
        ("trainer.epoch=3", "trainer.epoch: unknown key; did you mean 'epochs'?"),
        ("method.temprature=0.1", "method.temprature: unknown key; did you mean 'temperature'?"),
        ("method.name=simclrv9", "method.name: unknown method 'simclrv9'; did you mean"),
        ("data.name=imagenet", "data.name: Input should be 'digits', 'synthetic'"),
        ("logging.wandb.mode=cloud", "logging.wandb.mode: Input should be 'offline', 'online'"),
        ("optim.name=lasr", "optim.name: unknown optimizer 'lasr'; did you mean 'lars'?"),
        ("optim.lr.value=1", "optim.lr.value: optim.lr is a value ("),
        ("optim.lr", "optim.lr: an override must look like dotted.key=value"),
        ("optim.lr=[1", "optim.lr: cannot parse '[1' as YAML"),
        ("bogus.key=1", "bogus: unknown key; did you mean"),
    ],
)
def test_bad_overrides_name_their_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("simclr_lars", [override])
    assert expected in str(info.value)
    assert len(info.value.problems) == 1


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"registered: barlow_twins, byol, dino, mocov3, simclr, swav, vicreg$"
    ):
        load_config("simclr_lars", ["method.name=simclrv9"])


def test_byol_tau_must_rise() -> None:
    with pytest.raises(ConfigError, match="method: tau_final must be >= tau_base"):
        load_config("byol_lars", ["method.tau_base=0.999", "method.tau_final=0.99"])


def test_fp16_with_fsdp2_is_refused() -> None:
    with pytest.raises(ConfigError, match="trainer: precision fp16 needs a GradScaler"):
        load_config("simclr_lars", ["trainer.precision=fp16", "trainer.strategy=fsdp2"])
    assert load_config("simclr_lars", ["trainer.strategy=fsdp2"]).trainer.strategy == "fsdp2"


def test_byol_predictor_must_output_the_projection_width() -> None:
    with pytest.raises(ConfigError, match=r"method: predictor.out_dim \(64\) must equal"):
        load_config("byol_lars", ["method.predictor.out_dim=64"])


def test_unknown_config_file_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"--config: no file 'simclr_lasr'.*simclr_lars\.yaml"):
        load_config("simclr_lasr")
    with pytest.raises(ConfigError, match=r"--config: no file 'aaaa"):
        load_config("a" * 5000)  # a name too long for the OS is not a file either


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  name: lars\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+, column \d+ invalid YAML"):
        load_config(str(bad))


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("optim: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips() -> None:
    cfg = load_config("byol_lars")
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_is_merged_key_by_key_with_the_child_winning(tmp_path: Path) -> None:
    _write(
        tmp_path / "parent.yaml",
        "method: {name: simclr, temperature: 0.3}\n"
        "optim: {name: lars, lr: 0.5, exclude_from_weight_decay: ['@bias']}\n"
        "trainer: {epochs: 7, seed: 3}\nlogging: {wandb: {mode: disabled, tags: [a, b]}}\n",
    )
    child = _write(
        tmp_path / "child.yaml",
        "base: parent.yaml\ntrainer: {epochs: 9}\noptim: {lr: 0.1}\n"
        "logging: {wandb: {tags: [c]}}\n",
    )
    cfg = load_config(str(child))
    assert (cfg.trainer.epochs, cfg.trainer.seed) == (9, 3)
    assert (cfg.optim.lr, cfg.optim.exclude_from_weight_decay) == (0.1, ["@bias"])
    assert cfg.method.temperature == 0.3
    assert cfg.logging.wandb.tags == ["c"] and cfg.logging.wandb.mode == "disabled"
    # Another method replaces the section: SimCLR's temperature does not leak into BYOL.
    # ".yaml" is optional beside the child too.
    other = _write(tmp_path / "byol.yaml", "base: child\nmethod: {name: byol}\n")
    assert load_config(str(other)).method.name == "byol"
    assert load_config(str(child), ["trainer.epochs=11"]).trainer.epochs == 11


def test_only_method_and_optim_sections_are_replaced_by_another_name(tmp_path: Path) -> None:
    _write(
        tmp_path / "parent.yaml",
        "data: {name: digits, batch_size: 64, image_size: 16}\n"
        "optim: {name: lars, lr: 0.5, momentum: 0.8}\n"
        "logging: {wandb: {name: first, mode: disabled, tags: [a]}}\n",
    )
    child = _write(
        tmp_path / "child.yaml",
        "base: parent.yaml\ndata: {name: cifar10}\noptim: {name: sgd, lr: 0.1}\n"
        "logging: {wandb: {name: second}}\n",
    )
    merged = load_config(str(child))
    # data.name and logging.wandb.name are plain values: the rest of their section is kept.
    assert (merged.data.name, merged.data.batch_size, merged.data.image_size) == ("cifar10", 64, 16)
    assert (merged.logging.wandb.name, merged.logging.wandb.tags) == ("second", ["a"])
    assert merged.logging.wandb.mode == "disabled"
    # optim.name picks another config class: LARS's lr and momentum do not carry over.
    assert merged.optim.name == "sgd"
    assert (merged.optim.lr, merged.optim.momentum) == (0.1, 0.9)


def test_a_shipped_config_extends_another_by_name() -> None:
    byol, simclr = load_config("imagenet/byol"), load_config("imagenet/simclr")
    assert byol.data == simclr.data and byol.model == simclr.model
    assert byol.method.name == "byol" and byol.trainer.epochs == 300


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"a.yaml": "base: nowhere\n"},
            "a.yaml: base: no config 'nowhere' beside it or in configs/",
        ),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "base: a cycle of bases"),
        ({"a.yaml": "base: a.yaml\n"}, "base: a cycle of bases"),
        ({"a.yaml": "base: [x]\n"}, "a.yaml: base: expected a config name or path, got ['x']"),
        ({"a.yaml": f"base: {'b' * 5000}\n"}, "a.yaml: base: no config 'bbbb"),
    ],
)
def test_bad_bases_are_config_errors(tmp_path: Path, files: dict, message: str) -> None:
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "a.yaml"))
    assert message in str(info.value) and len(info.value.problems) == 1


ADAMW = ["optim={name: adamw, lr: 0.001}"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            [*ADAMW, "schedule.momentum.end=0.99"],
            "schedule.momentum: optimizer 'adamw' has no momentum",
        ),
        (
            ["schedule.momentum.end=1.0"],
            "schedule.momentum.end: 1.0 is no valid optim.momentum (Input should be less than 1)",
        ),
        (
            [
                "optim.weight_decay=0",
                "schedule.weight_decay.end=0.4",
                "optim.param_groups=[{match: [@1d], weight_decay: 0.1}]",
            ],
            "schedule.weight_decay: optim.param_groups[0].weight_decay (0.1) is no multiple",
        ),
        (["schedule.weight_decay.ends=0.4"], "schedule.weight_decay.ends: unknown key"),
        (["optim.clip_grad.max_norm=0"], "optim.clip_grad.max_norm: Input should be greater"),
        (["optim.freeze={params: [], steps: 2}"], "optim.freeze.params: List should have"),
    ],
)
def test_bad_schedules_clips_and_freezes_name_their_key(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("simclr_lars", overrides)
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value


def test_a_schedule_entry_loads_back_from_the_resolved_config() -> None:
    cfg = load_config("simclr_lars", ["schedule.weight_decay.end=0.4", *ADAMW])
    assert cfg.schedule.scheduled() == {"weight_decay": cfg.schedule.weight_decay}
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def _chain(folder: Path, depth: int, last_base: str) -> Path:
    """``c0.yaml`` with base ``c1.yaml`` ... ``c{depth-1}.yaml`` with base ``last_base``;
    ``c0`` sets the lr, the middle one the seed, the last one the epochs and another seed."""
    folder.mkdir()
    own = {
        0: "optim: {lr: 0.3}",
        depth // 2: "trainer: {seed: 5}",
        depth - 1: "trainer: {epochs: 7, seed: 1}",
    }
    for i in range(depth):
        base = f"c{i + 1}.yaml" if i < depth - 1 else last_base
        _write(folder / f"c{i}.yaml", f"base: {base}\n{own.get(i, '')}\n")
    return folder / "c0.yaml"


def test_a_base_chain_of_any_depth_loads(tmp_path: Path) -> None:
    """A thousand bases deep (beyond Python's recursion limit): every level merged, the child
    winning (the middle one's seed over the last one's)."""
    cfg = load_config(str(_chain(tmp_path / "deep", 1000, "simclr_lars")))
    assert cfg.optim.lr == 0.3 and cfg.trainer.seed == 5 and cfg.trainer.epochs == 7
    assert cfg.method.name == "simclr"


def test_a_cycle_at_the_end_of_a_deep_chain_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(_chain(tmp_path / "deep", 1000, "c0.yaml")))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{tmp_path / 'deep' / 'c999.yaml'}: base: a cycle")


@pytest.mark.parametrize("output_dir", ["", "   ", "\t"])
def test_an_empty_output_dir_is_refused(output_dir: str) -> None:
    """An empty name is the working directory, whose files a run would replace."""
    with pytest.raises(ConfigError) as info:
        load_config("simclr_lars", [f"trainer.output_dir='{output_dir}'"])
    assert info.value.problems == [
        "trainer.output_dir: empty, which is the working directory, whose files a run "
        "replaces; name a run directory"
    ]


def test_a_run_directory_that_is_the_data_folder_is_refused(tmp_path: Path) -> None:
    """Its report picture and checkpoints would lie among the images of an unlabelled folder."""
    data = tmp_path / "images"
    data.mkdir()
    for output_dir in (str(data), f"{data}/", str(tmp_path / "link")):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(data)
        with pytest.raises(ConfigError) as info:
            load_config(
                "simclr_lars",
                ["data.name=imagefolder", f"data.root={data}", f"trainer.output_dir={output_dir}"],
            )
        assert info.value.problems == [
            f"trainer.output_dir: {output_dir!r} is data.root, whose images the run's files "
            "would join; name a run directory outside it"
        ]
    inside = load_config(
        "simclr_lars",
        ["data.name=imagefolder", f"data.root={data}", f"trainer.output_dir={data}/run"],
    )
    assert inside.trainer.output_dir == f"{data}/run"
