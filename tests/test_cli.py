"""The `ppcr` command line: real subcommands on small synthetic data; bad input exits 2 with a message."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from ppcr.cli import main


def test_synth_and_prepare_via_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "refer"), "--num-images", "12", "--seed", "3"]) == 0
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
    assert result["no_target"] is False and result["instances"] == [
        {k: result[k] for k in ("box", "score", "mask_pixels")}
    ]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["segment", "/no/such.jpg", "the circle", "--random-weights"], "/no/such.jpg"),
        (
            ["segment", "/no/such.jpg", "the circle"],
            "give --checkpoint DIR (a trained model) or --server URL",
        ),
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


def _subparsers():
    from ppcr.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    """Before, ~20 options had no help and no default shown (`evaluate --dataset` defaulted silently)."""
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            what = f"ppcr {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in formatter._get_help_string(action), f"{what} hides its default"
    evaluate = _subparsers()["evaluate"].format_help()
    assert "(default: refcoco)" in " ".join(evaluate.split())


def _examples() -> list[tuple[str, list[str]]]:
    out = []
    for name, parser in _subparsers().items():
        lines = (parser.epilog or "").splitlines()
        assert lines and lines[0] == "examples:", f"ppcr {name} --help has no examples"
        out += [(name, shlex.split(line.strip())[1:]) for line in lines[1:]]
    return out


def test_every_help_example_parses_and_its_overrides_load():
    """Every `examples:` line of every --help parses, and its --set keys load into the config that
    command reads (before, `ppcr batch --help`'s own `--set train.steps=100` was refused)."""
    from ppcr.batch import load_batch_config
    from ppcr.cli import _overrides, build_parser
    from ppcr.config import load_config

    examples = _examples()
    assert len(examples) >= len(_subparsers())
    for _, argv in examples:
        a = build_parser().parse_args(argv)
        name = a.command
        sets = _overrides(getattr(a, "set", []))
        if name in ("batch", "evaluate"):
            load_batch_config(None, sets)
        elif name == "train":
            load_config(a.config, overrides=sets)
        elif name == "convert-glamm":
            load_config(a.config, overrides=sets)


def test_synth_help_example_runs(tmp_path, monkeypatch, capsys):
    """The cheap examples run for real: synth, then prepare on what it wrote."""
    monkeypatch.chdir(tmp_path)
    synth = [argv for name, argv in _examples() if name == "synth"]
    for argv in synth:
        if "--num-images" in argv:
            argv[argv.index("--num-images") + 1] = "6"
        assert main(argv) == 0, argv
    assert any((tmp_path / "data/shards/synthref_unc").iterdir())


def test_synth_old_images_flag_names_the_new_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", "x", "--images", "12"])
    assert exit_.value.code == 2
    assert "--images was renamed --num-images" in capsys.readouterr().err


def test_evaluate_lists_what_the_shards_hold_before_loading_a_model(tmp_path, synth_data, capsys):
    """The README's `ppcr evaluate` on the demo's shards without --dataset: the error lists the data sets
    and splits present (before, it failed on refcoco_unc with no hint of synthref)."""
    _, _, shards = synth_data
    argv = ["evaluate", "--checkpoint", str(tmp_path / "no-checkpoint"), "--shards", str(shards)]
    assert main(argv) == 2  # no model is loaded: the checkpoint does not even exist
    err = capsys.readouterr().err
    assert "has no split val, testA, testB of --dataset refcoco --split-by unc" in err
    assert "--dataset synthref --split-by unc: testA, testB, train, val" in err
    assert main([*argv, "--dataset", "synthref", "--splits", "dev"]) == 2
    assert "has no split dev of --dataset synthref" in capsys.readouterr().err


@pytest.mark.parametrize(
    "server, needle",
    [
        ("http://127.0.0.1:9", "cannot reach http://127.0.0.1:9 (connection refused)"),
        ("127.0.0.1:8000", "is not a valid http(s) URL"),
    ],
)
def test_segment_server_unreachable_is_one_plain_line(tmp_path, server, needle, capsys):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "the cup", "--server", server]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Max retries" not in err and "urllib3" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--dtype", "bfloat16"]])
def test_segment_server_refuses_in_process_model_flags(tmp_path, flags, capsys):
    """--device/--dtype choose the in-process model; with --server they were silently ignored."""
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    assert (
        main(["segment", str(tmp_path / "a.png"), "the cup", "--server", "http://127.0.0.1:9", *flags]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--device/--dtype place the in-process model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("status", [501, 200])
def test_segment_server_that_is_not_ppcr_is_one_line(tmp_path, status, capsys):
    """Before, another HTTP server's HTML error page was printed whole (13 lines), and an HTML 200
    ended in a JSONDecodeError traceback."""
    import http.server
    import threading

    from PIL import Image

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            page = b"<!DOCTYPE html>\n<html>\n<body>\n<p>hello</p>\n</body>\n</html>\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    try:
        assert main(["segment", str(tmp_path / "a.png"), "the cup", "--server", url]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"as text/html instead of the ppcr app's JSON: is {url} a ppcr server?" in err, err
    assert "<html>" not in err and "Traceback" not in err


@pytest.mark.parametrize("found", [0, 2])
def test_segment_server_answers_with_no_target_or_several_objects(tmp_path, found, capsys):
    """`ppcr segment --server` prints what the server answers: no_target and one entry per instance;
    its overlay says "no match" or draws each instance's box."""
    import http.server
    import threading

    from PIL import Image

    from ppcr.inference import Instance, Segmentation, encode_answer
    from ppcr.serve.app import _wire

    instances = []
    for x1, y1, x2, y2 in [(1, 1, 6, 5), (10, 3, 18, 9)][:found]:
        mask = np.zeros((10, 20), bool)
        mask[y1:y2, x1:x2] = True
        instances.append(Instance(mask, np.array([x1, y1, x2, y2], float), 0.5))
    answer = json.dumps(_wire(encode_answer(Segmentation.of(instances, (10, 20))))).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    try:
        argv = [
            "segment",
            str(tmp_path / "a.png"),
            "the cups",
            "--server",
            url,
            "--out",
            str(tmp_path / "o.png"),
        ]
        assert main(argv) == 0
    finally:
        server.shutdown()
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["no_target"] is (found == 0) and len(printed["instances"]) == found
    assert printed["mask_pixels"] == (0 if found == 0 else 20 + 48)
    if found:
        assert [i["box"] for i in printed["instances"]] == [[1, 1, 6, 5], [10, 3, 18, 9]]
        assert printed["box"] == [1, 1, 18, 9] and printed["score"] == 0.5
    else:
        assert printed["box"] is None and printed["score"] is None
    drawn = np.asarray(Image.open(tmp_path / "o.png"))
    assert drawn.shape[1] == 20
    if found:  # each object in its own colour (the image is the overlay's last 10 rows, under the banner)
        from ppcr.visualize import INSTANCE_COLORS

        assert (
            tuple(drawn[-10 + 1, 1]) == INSTANCE_COLORS[0] and tuple(drawn[-10 + 3, 10]) == INSTANCE_COLORS[1]
        )


def test_undecodable_image_error_has_no_internal_repr(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"hello, not an image")
    assert main(["segment", str(tmp_path / "a.png"), "the cup", "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image (not a format Pillow reads" in err and "BytesIO" not in err


def test_batch_missing_input_is_one_line_before_ray_starts(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """Before, Ray started and pyarrow's "[Errno 2] Failed to open local file ... Detail: ..." ended it."""
    import ppcr.ray_cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the paths were checked")

    monkeypatch.setattr(ppcr.ray_cluster, "init_ray", no_ray)
    argv = ["batch", "--input", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--checkpoint", str(tiny_checkpoint)]) == 2
    rows = tmp_path / "rows.jsonl"
    assert capsys.readouterr().err == f"ppcr batch: error: --input {rows}: no such file or folder\n"
    rows.write_text("")
    assert main([*argv, "--checkpoint", str(tmp_path / "ckpt")]) == 2
    assert f"--checkpoint {tmp_path / 'ckpt'}: no such file or folder" in capsys.readouterr().err


@pytest.mark.slow  # starts Ray and Serve in a child process
@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_ctrl_c_stops_ppcr_serve_with_one_line(tiny_checkpoint, how):
    """Before, Ctrl-C on `ppcr serve` printed an 18-line traceback, and SIGTERM (`kill`, a service
    manager) a C++ stack from Ray's fatal-signal handler."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from ppcr.serve import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "ppcr", "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(1)
        else:
            pytest.fail("ppcr serve did not become healthy")
        if how == "Ctrl-C":  # what a terminal sends: SIGINT to the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # `kill PID`: the ppcr process alone
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if how == "Ctrl-C" else 143), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "logging.cc" not in err, err
    assert err.strip().splitlines()[-1] == f"ppcr serve: stopped ({how})"
    # ("ready at" may not be printed yet: /healthz can answer before serve.run returns.)
    assert out.startswith(f"ppcr serve: starting on http://127.0.0.1:{port}/")


@pytest.mark.slow  # a Ray Data job in a child process
def test_batch_prints_its_own_lines_not_ray_datas_progress_log(tiny_checkpoint, tmp_path):
    """Before, `ppcr batch` printed ~60 lines of Ray Data's progress logging for 10 rows (stderr not a
    terminal). Now: one start line, one summary line, and Ray's own start-up lines."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [
        {"image": str(tmp_path / "a.png"), "expression": f"the red thing {i}", "id": str(i)}
        for i in range(10)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "ppcr", "batch", "--input", str(tmp_path / "rows.jsonl"), "--out",
           str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("ppcr batch:")]
    assert len(ours) == 2 and ours[1].startswith("ppcr batch: done 10,"), lines
    assert not [line for line in lines if "logging_progress" in line or "Execution plan" in line], lines
    assert len(lines) <= 8, lines
    assert json.loads(done.stdout)["done"] == 10


# Help examples a test machine cannot run, and why; every other example runs in the test below.
NOT_RUN = {
    "data/refer": "needs RefCOCO's annotations and COCO's images",
    "ppcr_llava7b": "trains LLaVA-1.5-7B on GPUs",
    "runs/ppcr-7b": "exports that 7B run",
    "--ray --config configs/batch/cpu.yaml": "needs a prepared refcoco (the default --dataset)",
    "--config configs/batch/cpu.yaml --set mllm.batch_size=4 --overlays": "the first batch example, sized",
    "--server": "needs a running server (tests/test_serve.py drives one)",
    "ppcr serve": "runs until stopped (the Ctrl-C test above starts one)",
    "ppcr demo": "trains for minutes (tests/test_demo.py)",
    "convert-glamm": "needs GLaMM's weights",
}


@pytest.mark.slow  # trains a few steps, starts Ray for `ppcr batch`
def test_help_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The examples of every --help run as written, in order, in an empty folder (only the sizes
    shrink: fewer images and steps), on the files the earlier ones wrote; a photo, a rows.jsonl and a
    manifest stand where the examples name a user's files."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (30, 60, 220)).save("photo.jpg")
    Path("data").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save("data/red.png")
    mine = {"image": "red.png", "expression": "the red picture", "mask": [[0, 0, 39, 0, 39, 29, 0, 29]]}
    Path("data/mine.jsonl").write_text(json.dumps(mine) + "\n")
    Path("rows.jsonl").write_text(json.dumps({"image": "photo.jpg", "expression": "the blue one"}) + "\n")
    ran = []
    for name, argv in _examples():  # in the parser's order: synth, prepare, train, ...
        line = shlex.join(["ppcr", *argv])
        if any(key in line for key in NOT_RUN):
            continue
        sizes = {"200": "8", "100": "2"}  # synth --num-images 200, train.steps=100
        argv = [sizes.get(v, v).replace("train.steps=100", "train.steps=2") for v in argv]
        if name == "evaluate":  # the demo's folders: the trained run's checkpoint and the shards
            Path("demo_out").mkdir(exist_ok=True)
            for link, target in (("checkpoint", "runs/tiny/checkpoint"), ("shards", "data/shards")):
                if not Path("demo_out", link).exists():
                    Path("demo_out", link).symlink_to(tmp_path / target)
        capsys.readouterr()
        assert main(argv) == 0, (line, capsys.readouterr().err[-2000:])
        ran.append(line)
    assert Path("overlay.png").is_file() and Path("batch_out/results").is_dir()
    commands = {line.split()[1] for line in ran}
    assert commands >= {"synth", "prepare", "train", "evaluate", "batch", "segment"}, ran


def test_every_command_help_opens_with_its_one_line_summary():
    """`ppcr NAME --help` starts with what NAME does (the line `ppcr --help` lists), not only usage."""
    from ppcr.cli import build_parser

    top = build_parser()
    summaries = {a.dest: a.help for a in top._subparsers._group_actions[0]._choices_actions}
    for name, parser in _subparsers().items():
        text = parser.format_help()
        body = " ".join(text.split("\n\n", 1)[1].split())
        assert body.startswith(summaries[name]), f"ppcr {name} --help does not open with its summary"
        assert max(len(line) for line in parser.description.splitlines()) <= 100, name


@pytest.mark.parametrize("grefcoco", [[], ["--grefcoco"]])
@pytest.mark.parametrize(
    "option,said",
    [
        (["--steps", "0"], "demo steps must be a whole number >= 1, got 0"),
        (["--images", "9"], "demo images must be a whole number >= 10 (one per split at least), got 9"),
    ],
)
def test_demo_steps_and_images_are_checked_before_anything_is_written(
    tmp_path, capsys, grefcoco, option, said
):
    out = tmp_path / "demo"
    assert main(["demo", *grefcoco, *option, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and said in err
    assert not out.exists()


def test_demo_steps_stretch_the_default_time_bound_and_an_explicit_bound_wins():
    from ppcr.demo import DemoSettings, GrefDemoSettings, _schedule

    for base in (DemoSettings(), GrefDemoSettings()):
        longer = _schedule(base, 4 * base.steps, None)
        assert (longer.steps, longer.train_minutes) == (4 * base.steps, 4 * base.train_minutes)
        shorter = _schedule(base, base.steps // 2, None)  # the bound never shrinks below the default
        assert (shorter.steps, shorter.train_minutes) == (base.steps // 2, base.train_minutes)
        assert _schedule(base, 4 * base.steps, 30.0).train_minutes == 30.0
        assert _schedule(base, None, None) == base
        more = _schedule(base, None, None, images=3600)
        assert more.data.num_images == 3600 and more.data.generalized == base.data.generalized
        assert base.data.num_images == 900  # the defaults are not mutated
