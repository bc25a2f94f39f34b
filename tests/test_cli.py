"""The `ppcr` command line: real subcommands on small synthetic data; bad input exits 2 with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppcr.cli import main


def test_synth_and_prepare_via_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "refer"), "--images", "12", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12
    rc = main(
        [
            "prepare",
            "--refer-root",
            str(tmp_path / "refer"),
            "--images",
            summary["images_dir"],
            "--dataset",
            "synthref",
            "--split-by",
            "unc",
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    assert rc == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert sum(written.values()) == 12


def test_prepare_missing_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(
        [
            "prepare",
            "--refer-root",
            str(tmp_path / "nope"),
            "--images",
            str(tmp_path),
            "--dataset",
            "refcoco",
            "--split-by",
            "unc",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("ray", [False, True])
def test_prepare_unknown_dataset_is_one_line(tmp_path, capsys, ray):
    argv = ["prepare", "--refer-root", str(tmp_path), "--images", str(tmp_path), "--dataset", "refcocoo"]
    rc = main(argv + ["--split-by", "unc", "--out", str(tmp_path / "o")] + (["--ray"] if ray else []))
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        err.count("\n") == 1 and "unknown dataset/split_by 'refcocoo'/'unc'" in err and "refcoco/unc" in err
    )
    assert not (tmp_path / "o").exists()


def test_train_bad_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("base: tiny\nmodel:\n  box_head: mpl\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "model.box_head must be one of mlp, attention; got 'mpl'" in capsys.readouterr().err


def test_train_missing_shards_is_a_clear_error(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"data.shards_root={tmp_path / 'absent'}",
        ]
    )
    assert rc == 2
    assert "absent" in capsys.readouterr().err


def test_train_evaluate_segment_round_trip(tmp_path, synth_data, capsys):
    _, images_dir, shards = synth_data
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--local",
            "--config",
            "tiny",
            "--out",
            str(out),
            "--set",
            f"data.shards_root={shards}",
            "--set",
            "train.steps=3",
            "--set",
            "train.log_every=1",
        ]
    )
    assert rc == 0
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert {"bce", "dice", "l1", "ce", "lr", "samples_per_s"} <= set(json.loads(lines[0]))
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(out / "checkpoint"),
            "--shards",
            str(shards),
            "--dataset",
            "synthref",
            "--splits",
            "val",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "synthref/unc/val" in json.dumps(report)
    image = sorted(Path(images_dir).glob("*.jpg"))[0]
    capsys.readouterr()
    rc = main(
        [
            "segment",
            str(image),
            "the red circle",
            "--checkpoint",
            str(out / "checkpoint"),
            "--out",
            str(tmp_path / "overlay.png"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "overlay.png").stat().st_size > 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(result["box"]) == 4 and isinstance(result["score"], float)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["segment", "/no/such.jpg", "the circle"], "/no/such.jpg"),
    ],
)
def test_segment_errors(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_train_local_cut_short_by_time_budget_says_so(tmp_path, synth_data, capsys):
    """A run the --time-budget stops early still saves, and says loudly that it is under-trained."""
    _, _, shards = synth_data
    argv = ["train", "--local", "--config", "tiny", "--out", str(tmp_path / "run"), "--time-budget", "0"]
    argv += ["--set", f"data.shards_root={shards}", "--set", "train.steps=3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "CUT training SHORT" in err and "0 of 3 planned steps" in err
    assert (tmp_path / "run" / "checkpoint").is_dir()
