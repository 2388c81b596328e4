"""The demo (examples/demo.py): its runner, its parsers of fairseq's outputs, and (marked
``slow``) the whole pipeline end to end in ``--quick`` mode, run twice."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time

import matplotlib.image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "demo.py")


def _load_demo():
    spec = importlib.util.spec_from_file_location("avplugins_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _runner(tmp_path):
    return demo.Runner(str(tmp_path / "out"), dict(os.environ))


def _python_step(name, code, outputs=()):
    return demo.Step(name, [sys.executable, "-c", code], list(outputs))


def test_runner_reuses_finished_steps_and_reruns_when_an_output_is_gone(tmp_path, capsys):
    target = tmp_path / "made.txt"
    step = _python_step("make", f"open({str(target)!r}, 'a').write('x')", [str(target)])
    runner = _runner(tmp_path)
    runner.run(step)
    runner.run(step)
    assert target.read_text() == "x"  # the second run did not execute the command
    assert "make: reusing" in capsys.readouterr().out
    target.unlink()
    runner.run(step)
    assert target.read_text() == "x" and "make: done in" in capsys.readouterr().out


def test_failing_step_reports_its_log_tail_and_leaves_no_marker(tmp_path):
    runner = _runner(tmp_path)
    step = _python_step("broken", "import sys; print('line one'); sys.exit('the reason it broke')")
    with pytest.raises(demo.StepFailed, match=r"(?s)step broken failed \(exit 1\).*the reason it broke"):
        runner.run(step)
    assert not os.path.exists(runner.marker(step))
    assert "line one" in open(runner.log_path("broken")).read()


def test_step_that_forgets_an_output_fails(tmp_path):
    step = _python_step("lazy", "pass", [str(tmp_path / "never.txt")])
    with pytest.raises(demo.StepFailed, match="did not write .*never.txt"):
        _runner(tmp_path).run(step)


def test_chains_keep_their_order_run_side_by_side_and_survive_a_failure(tmp_path):
    runner = _runner(tmp_path)
    order, lock, running, overlap = [], threading.Lock(), [0], [0]

    def action(label):
        def record(log):
            with lock:
                order.append(label)
                running[0] += 1
                overlap[0] = max(overlap[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1
            if label == "b1":
                raise RuntimeError("b1 is broken")
        return record

    chains = [[demo.Step(label, action=action(label)) for label in (f"{chain}0", f"{chain}1", f"{chain}2")]
              for chain in "ab"]
    with pytest.raises(demo.StepFailed, match="step b1 failed"):
        demo.run_chains(runner, chains, jobs=2)
    assert [label for label in order if label.startswith("a")] == ["a0", "a1", "a2"]
    assert "b2" not in order and "b1" in order  # the failed chain stops, the other finishes
    assert overlap[0] == 2
    assert "RuntimeError: b1 is broken" in open(runner.log_path("b1")).read()


def test_chance_levels_of_the_offset_grid():
    chance = demo.chance_accuracies(21)
    assert chance["accuracy_1"] == pytest.approx(100 / 21)
    # 19 inner classes with 3 accepted answers, 2 end classes with 2
    assert chance["accuracy_1_tol"] == pytest.approx(100 * (19 * 3 + 2 * 2) / 21 ** 2)


def test_constant_guess_baseline(tmp_path):
    (tmp_path / "train.wrd").write_text("a a b\na c\n")
    (tmp_path / "test.wrd").write_text("a a a a\nb a\n")
    baseline = demo.constant_guess_wer(str(tmp_path))
    # "a" x k against 6 words: k=0 -> 6 errors, k=2 -> 2 + 1 = 3, k=3 -> 1 + 2 = 3, k=4 -> 0 + 3 = 3
    assert baseline["word"] == "a" and baseline["repeats"] == 2 and baseline["wer"] == pytest.approx(50.0)


def test_parsers_of_fairseq_outputs(tmp_path):
    train_log = tmp_path / "train.log"
    train_log.write_text("\n".join([
        "[2026-01-01 00:00:00,000][fairseq_cli.train][INFO] - {'common': 'a dict, not a JSON record'}",
        '[2026-01-01 00:00:01,000][train_inner][INFO] - {"epoch": 1, "update": 0.5, "loss": "3.5", '
        '"accuracy": "0.25", "num_updates": "10", "lr": "0.001"}',
        '[2026-01-01 00:00:02,000][valid][INFO] - {"epoch": 1, "valid_loss": "3.1", "valid_accuracy_1": "0.4", '
        '"valid_num_updates": "10"}',
        '[2026-01-01 00:00:03,000][train_inner][INFO] - {"epoch": 2, "update": 1.5, "loss": "2.5", '
        '"num_updates": "20"}',
    ]))
    summaries = [demo._evaluation_summary(line) for line in train_log.read_text().splitlines()]
    assert summaries == [None, None, "valid on update 10: loss 3.1 accuracy_1 0.4", None]
    curves = demo.training_curves(str(train_log))
    assert curves["train_loss"] == [(10, 3.5), (20, 2.5)]
    assert curves["valid_accuracy_1"] == [(10, 0.4)] and curves["valid_loss"] == [(10, 3.1)]

    validate_log = tmp_path / "validate.log"
    validate_log.write_text('2026-01-01 | INFO | test | {"test_loss": "1.2", "test_accuracy_1": "0.8125", '
                            '"test_accuracy_1_tol": "0.9375", "test_accuracy_5": "1"}\n')
    assert demo.validate_metrics(str(validate_log)) == pytest.approx(
        {"accuracy_1": 81.25, "accuracy_1_tol": 93.75, "accuracy_5": 100.0})
    validate_log.write_text("nothing useful\n")
    with pytest.raises(ValueError, match="no accuracy_1"):
        demo.validate_metrics(str(validate_log))

    (tmp_path / "generate-test.txt").write_text(
        "S-0\ta b\nH-0\t-0.1\ta b\nD-0\t-0.1\ta b\nS-1\tc\nH-1\t-0.2\td\nGenerate test with beam=5: WER: 33.33\n")
    assert demo.generated_wer(str(tmp_path)) == {"wer": 33.33, "utterances": 2}


@pytest.mark.slow
def test_quick_demo_end_to_end_then_reused(tmp_path):
    """``examples/demo.py --quick`` through every public command, then again: all reused."""
    out = tmp_path / "demo"
    command = [sys.executable, DEMO, "--quick", "--device", "cpu", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    results = out / "results"
    table = (results / "results.md").read_text()
    assert "| speech_long |" in table and "| sparse |" in table and "| AVSR (audio,video) |" in table
    assert table.split("### AV-data2vec")[0].strip() in first.stdout  # the table is printed too
    report = json.loads((results / "results.json").read_text())
    for corpus in ("speech_long", "sparse"):
        entry = report["synchformer"][corpus]
        assert 0 <= entry["test"]["accuracy_1"] <= entry["test"]["accuracy_1_tol"] <= 100
        assert len(entry["predictions"]) == 3 and {row["truth_s"] for row in entry["predictions"]} == {-1.0, 0.0, 1.0}
        assert all(row["estimate_s"] is not None for row in entry["predictions"])
    assert set(report["av_data2vec"]["wer"]) == {"ASR", "VSR", "AVSR"}
    assert set(report["av_data2vec"]["wer"]["AVSR"]) == {"clean", "0dB"}
    for plot in ("training_curves", "offset_confusion_speech_long", "offset_confusion_sparse", "wer_per_snr",
                 "avsync_predict_speech_long", "avsync_predict_sparse"):
        image = matplotlib.image.imread(results / f"{plot}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 200, plot
    ran = re.findall(r"^\[demo\] (\S+): done in", first.stdout, flags=re.MULTILINE)
    assert len(ran) >= 20 and "d2v_decode_AVSR_0dB" in ran and "sync_predict_sparse" in ran

    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    reused = re.findall(r"^\[demo\] (\S+): reusing", second.stdout, flags=re.MULTILINE)
    assert sorted(reused) == sorted(ran) and "done in" not in second.stdout
    assert (results / "results.md").read_text() == table


def test_example_prediction_is_chosen_by_truth_inside_the_grid():
    rows = [{"truth_s": t, "estimate_s": e} for t, e in ((-2.0, 2.0), (0.0, 0.0), (-1.6, 0.4), (0.8, 0.8))]
    assert demo.example_prediction(rows)["truth_s"] == -1.6  # not the best-predicted one (0.8)
    assert demo.example_prediction(rows[:2])["truth_s"] == -2.0  # nothing inside: the first row
