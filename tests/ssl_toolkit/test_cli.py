"""The pretraining command line: exit codes, messages without tracebacks, dry run, resume."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_toolkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone=timm/test_resnet",
    "data.name=synthetic",
    "data.batch_size=32",
    "method.projector={hidden_dim: 32, out_dim: 16}",
    "logging.wandb.mode=disabled",
    "trainer.device=cpu",
    "trainer.max_steps=2",
    "eval.knn_k=5",
]


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "simclr_lars", "optim.lr=-1"], "optim.lr: Input should be greater than"),
        (["--config", "simclr_lars", "optim.momentun=0.9"], "optim.momentun: unknown key"),
        (
            ["--config", "simclr_lars", "model.backbone=resnet1800"],
            "model.backbone: Unknown backbone 'resnet1800'. Close names: resnet18",
        ),
        (
            [
                "--config",
                "simclr_lars",
                "model.backbone=timm/vit_tiny_patch16_224",
                "model.cifar_stem=true",
            ],
            "model: cifar_stem=True is only supported for ResNet-style backbones",
        ),
        (["--config", "nope"], "--config: no file 'nope'"),
        (
            ["--config", "simclr_lars", "data.name=cifar10", "data.root=/nonexistent/cifar"],
            "data.root",
        ),
        (["--config", "simclr_lars", "--resume", "/nonexistent/last.pt"], "/nonexistent/last.pt"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(capsys, args: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys, "--config", "simclr_lars", "trainer.device=cuda", f"trainer.output_dir={tmp_path}"
    )
    assert code == 2 and "cuda" in err.lower() and "Traceback" not in err


def test_corrupt_checkpoint_exits_2_naming_the_file(capsys, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(
        capsys,
        "--config",
        "simclr_lars",
        *TINY,
        f"trainer.output_dir={tmp_path / 'run'}",
        "--resume",
        str(ckpt),
    )
    assert code == 2
    assert str(ckpt) in err and "Traceback" not in err


def test_checkpoint_of_another_model_exits_2(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")[0] == 0
    code, _, err = run_cli(
        capsys,
        "--config",
        "simclr_lars",
        *TINY,
        "method.projector.out_dim=8",
        f"trainer.output_dir={run}",
        "--resume",
        "auto",
    )
    assert code == 2
    assert "does not match this config" in err


def test_dry_run_prints_config_and_every_parameter_rule(capsys) -> None:
    code, out, _ = run_cli(capsys, "--config", "simclr_lars", "--dry-run")
    assert code == 0
    assert "optim:" in out and "name: lars" in out
    assert "backbone.layer1.0.bn1.weight" in out
    assert "projector.layers.0.weight" in out
    assert "no adaptation: @norm" in out


def test_run_then_resume_auto_continues(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")
    assert code == 0 and f"run directory: {run}" in out
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    code, _, err = run_cli(
        capsys,
        "--config",
        "simclr_lars",
        *TINY,
        "trainer.max_steps=3",
        f"trainer.output_dir={run}",
        "--resume",
        "auto",
    )
    assert code == 0
    assert "resumed from" in err and "at step 2" in err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["trainer"]["step"] == 3


def test_script_exit_code_and_usage_error() -> None:
    """The real script: argparse usage errors exit 2 too."""
    script = ROOT / "scripts" / "pretrain.py"
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2
    assert "--config" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(script), "--config", "simclr_lars", "optim.eta=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optim.eta: Input should be greater than 0 (got 0)"


def test_unknown_method_is_one_unbroken_line_listing_the_registered_ones(capsys) -> None:
    code, _, err = run_cli(capsys, "--config", "simclr_lars", "method.name=simclrv9")
    assert code == 2
    assert err == (
        "error: method.name: unknown method 'simclrv9'; did you mean 'simclr'? "
        "registered: barlow_twins, byol, dino, mocov3, simclr, swav, vicreg\n"
    )


def test_linear_eval_script_runs_both_protocols(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")[0] == 0
    spec = importlib.util.spec_from_file_location("linear_eval", ROOT / "scripts/linear_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "linear probe (L-BFGS), all labels" in out and "kNN (k=5)" in out
    args = [str(run), "--protocol", "sgd", "--epochs", "1", "--batch-size", "64"]
    assert script.main(args) == 0
    assert "linear (SGD, 1 epochs, crops and flips)" in capsys.readouterr().out
    assert script.main([str(tmp_path / "missing")]) == 2


def _dry_run_rows(capsys, *args: str) -> dict[str, list[str]]:
    """The cells of each parameter's row of a successful ``--dry-run`` table, by name."""
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    return {
        cells[0]: cells
        for line in out.splitlines()
        if (cells := [c.strip() for c in line.split("│")[1:-1]]) and "." in cells[0]
    }


def test_dry_run_shows_a_vits_adamw_exclusions(capsys) -> None:
    """AdamW's decay exclusions of the ViT recipes (DINO's, timm's) through the rules: norms,
    biases, the position embedding and the class token get none; every other weight keeps it."""
    optim = (
        "optim={name: adamw, lr: 0.0005, weight_decay: 0.04, exclude_from_weight_decay: "
        "[@norm, @bias, '*pos_embed', '*cls_token']}"
    )
    args = ["--config", "mocov3_lars", "model.backbone=timm/test_vit", optim, "--dry-run"]
    rows = _dry_run_rows(capsys, *args)
    for name, rule in [
        ("backbone.pos_embed", "no decay: *pos_embed"),
        ("backbone.cls_token", "no decay: *cls_token"),
        ("backbone.blocks.0.norm1.weight", "no decay: @norm"),
        ("backbone.blocks.0.attn.qkv.bias", "no decay: @bias"),
    ]:
        assert rows[name][2:4] == [rule, "0"], name
    assert rows["backbone.blocks.0.attn.qkv.weight"][2:4] == ["default", "0.04"]


def test_the_dino_vit_recipes_dry_run_shows_its_exclusions_and_frozen_last_layer(capsys) -> None:
    """imagenet/dino_vits16 (on timm's test ViT): pos_embed, cls_token, norms and biases
    without weight decay, the last layer frozen for the first epoch, the rest decayed."""
    args = ["--config", "imagenet/dino_vits16", "model.backbone=timm/test_vit", "--dry-run"]
    rows = _dry_run_rows(capsys, *args)
    for name, rule in [
        ("backbone.pos_embed", "no decay: *pos_embed"),
        ("backbone.cls_token", "no decay: *cls_token"),
        ("backbone.norm.weight", "no decay: @norm"),
        ("head.mlp.0.bias", "no decay: @bias"),
    ]:
        assert rows[name][2:4] == [rule, "0"], name
    assert rows["head.mlp.0.weight"][2:4] == ["default", "0.04"]
    frozen = "frozen 1251 steps: head.last_layer.*"
    assert rows["head.last_layer.parametrizations.weight.original1"][2] == frozen


def test_overrides_may_come_before_and_after_options(capsys) -> None:
    code, out, err = run_cli(
        capsys,
        "--config",
        "simclr_lars",
        "trainer.max_steps=7",
        "--resume",
        "auto",
        "optim.lr=0.25",
        "--dry-run",
        "logging.wandb.mode=disabled",
    )
    assert code == 0, err
    assert "  max_steps: 7\n" in out and "  lr: 0.25\n" in out and "    mode: disabled\n" in out


def test_an_empty_output_dir_is_exit_2_and_the_working_directory_is_untouched(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("summary.json", "backbone.pt"):
        (tmp_path / name).write_text("the user's own file")
    code, _, err = run_cli(capsys, "--config", "simclr_lars", *TINY, "trainer.output_dir=''")
    assert code == 2
    assert err.splitlines() == [
        "error: trainer.output_dir: empty, which is the working directory, whose files a run "
        "replaces; name a run directory"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "summary.json"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"the user's own file"}
