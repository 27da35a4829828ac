"""Hostile or careless YAML: duplicate keys, alias bombs, huge values, non-numbers as numbers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from optim import ConfigError
from ssl_toolkit.config import load_config
from ssl_toolkit.yaml_loader import load_yaml
from tests.ssl_toolkit.test_cli import run_cli


def _lines(err: str) -> list[str]:
    return err.splitlines()


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "base: simclr_lars\ntrainer: {max_steps: 3}\noptim: {lr: 0.2}\ntrainer:\n  seed: 4\n",
            "line 4, column 1 invalid YAML: duplicate key 'trainer' (first at line 2)",
        ),
        (
            "base: simclr_lars\noptim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n",
            "line 5, column 3 invalid YAML: duplicate key 'lr' (first at line 3)",
        ),
        (
            "base: simclr_lars\nmethod: {temperature: 0.2, temperature: 0.3}\n",
            "line 2, column 28 invalid YAML: duplicate key 'temperature' (first at line 2)",
        ),
    ],
    ids=["section", "nested", "flow"],
)
def test_a_key_written_twice_in_a_file_is_refused(
    capsys, tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "--config", str(path), "--dry-run")
    assert code == 2
    assert _lines(err) == [f"error: {path}: {message}"]


def test_merge_keys_are_not_duplicates_but_a_repeated_key_is(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "base: byol_lars\n"
        "method:\n"
        "  projector: &head {hidden_dim: 64, out_dim: 32}\n"
        "  predictor:\n"
        "    <<: *head\n"
        "    hidden_dim: 48\n"
    )
    cfg = load_config(str(merged))
    # A key of the mapping itself beats the one merged in: not a duplicate.
    assert (cfg.method.predictor.hidden_dim, cfg.method.predictor.out_dim) == (48, 32)
    twice = tmp_path / "twice.yaml"
    twice.write_text(merged.read_text() + "    hidden_dim: 40\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(twice))
    assert info.value.problems == [
        f"{twice}: line 7, column 5 invalid YAML: duplicate key 'hidden_dim' (first at line 6)"
    ]


def test_a_key_written_twice_in_an_override_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("simclr_lars", ["method.projector={hidden_dim: 32, hidden_dim: 64}"])
    assert info.value.problems == [
        "method.projector: cannot parse '{hidden_dim: 32, hidden_dim: 64}' as YAML: "
        "duplicate key 'hidden_dim' (first at line 1)"
    ]


def _alias_bomb(target: str) -> str:
    """Nine levels of ten aliases each: a billion strings once expanded."""
    lines = ["base: simclr_lars", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    return "\n".join([*lines, target, ""])


BOMB = "invalid YAML: the document holds more than 100,000 values once its aliases are expanded"


@pytest.mark.parametrize(
    "text, message",
    [
        # Before line 6 the document holds 12,351 values; each *d on it adds 11,111: the eighth
        # (column 36) passes 100,000.
        (_alias_bomb("trainer: {output_dir: *i}"), f"line 6, column 36 {BOMB}"),
        (_alias_bomb("logging: {wandb: {tags: *i}}"), f"line 6, column 36 {BOMB}"),
        (
            "base: simclr_lars\ntrainer:\n  output_dir: &out [x, *out]\n",
            "line 3, column 24 invalid YAML: alias *out refers to a value that contains it",
        ),
    ],
    ids=["output_dir", "tags", "recursive"],
)
def test_an_alias_bomb_is_refused_quickly(capsys, tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "--config", str(path), "--dry-run")
    assert time.perf_counter() - start < 20
    assert code == 2
    assert _lines(err) == [f"error: {path}: {message}"]


LONG_LIST = "[" + ", ".join(["x"] * 2_000) + "]"  # a repr of 10,000 characters


@pytest.mark.parametrize(
    "text, overrides, start",
    [
        (
            f"base: simclr_lars\ntrainer: {{output_dir: {LONG_LIST}}}\n",
            [],
            "error: trainer.output_dir: Input should be a valid string (got ['x', 'x', ",
        ),
        (
            f"base: simclr_lars\ntrainer: {{epochs: {'z' * 20_000}}}\n",
            [],
            "error: trainer.epochs: Input should be a valid integer, unable to parse string as "
            "an integer (got 'zzz",
        ),
        (
            f"base: simclr_lars\ntrainer: {{output_dir: {LONG_LIST}}}\n",
            ["trainer.output_dir.sub=1"],
            "error: trainer.output_dir.sub: trainer.output_dir is a value (['x', 'x', ",
        ),
        (
            f"base: {LONG_LIST}\n",
            [],
            "error: {path}: base: expected a config name or path, got ['x', 'x', ",
        ),
    ],
    ids=["list", "string", "section", "base"],
)
def test_a_huge_value_is_echoed_cut_short(
    capsys, tmp_path: Path, text: str, overrides: list[str], start: str
) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "--config", str(path), "--dry-run", *overrides)
    assert code == 2
    [line] = _lines(err)
    assert line.startswith(start.format(path=path))
    assert "..." in line
    assert len(line.replace(str(path), "")) < 250


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr: Input should be a finite number (got 'inf')"),
        ("optim.lr=.nan", "optim.lr: Input should be a finite number (got nan)"),
        ("optim.lr=true", "optim.lr: a boolean is not a number (got True)"),
        ("optim.weight_decay=1e400", "optim.weight_decay: Input should be a finite number"),
        (
            "optim.param_groups=[{match: ['*'], lr_scale: .inf}]",
            "optim.param_groups[0].lr_scale: Input should be a finite number (got inf)",
        ),
        ("schedule.final_lr=.inf", "schedule.final_lr: Input should be a finite number (got inf)"),
        ("data.color_strength=.inf", "data.color_strength: Input should be a finite number"),
        ("data.batch_size=true", "data.batch_size: a boolean is not a number (got True)"),
        ("trainer.seed=false", "trainer.seed: a boolean is not a number (got False)"),
    ],
)
def test_non_finite_or_boolean_numbers_exit_2(capsys, override: str, message: str) -> None:
    code, _, err = run_cli(capsys, "--config", "simclr_lars", "--dry-run", override)
    assert code == 2
    assert _lines(err)[0].startswith(f"error: {message}")
    assert len(_lines(err)) == 1


@pytest.mark.parametrize(
    "value", [f"1{'0' * 5000}", "0x" + "f" * 5000, "9223372036854775808", "-0x8000000000000001"]
)
def test_an_integer_beyond_64_bits_exits_2(capsys, tmp_path: Path, value: str) -> None:
    path = tmp_path / "digits.yaml"
    path.write_text(f"base: simclr_lars\ntrainer:\n  seed: {value}\n")
    code, _, err = run_cli(capsys, "--config", str(path), "--dry-run")
    assert code == 2
    assert _lines(err) == [
        f"error: {path}: line 3, column 9 invalid YAML: an integer beyond 64 bits"
    ]


def test_the_largest_64_bit_integer_is_read() -> None:
    assert load_yaml("seed: 9223372036854775807") == {"seed": 2**63 - 1}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "optim:\n  name: lars\n  lr: [0.1\n",
            "line 4, column 1 invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence)",
        ),
        (
            "optim: !!python/object/apply:os.system ['echo hi']\n",
            "line 1, column 8 invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
    ],
    ids=["syntax", "python-tag"],
)
def test_invalid_yaml_is_one_line(capsys, tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "--config", str(path), "--dry-run")
    assert code == 2
    assert _lines(err) == [f"error: {path}: {message}"]
