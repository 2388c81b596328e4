"""AV-data2vec learns through fairseq's real trainer and decoder (subprocesses, the CLIs users
run): a short tiny pre-training whose loss falls without collapse, then an ASR fine-tune
initialised from it whose beam-search WER on the utterances it was trained on ends far below
100 %, then the recipe's second stage (audio+video with modality dropout and babble, started
from the ASR model with checkpoint.finetune_from_model) keeping what the first learnt. A few
minutes on 2 CPU cores (one thread per process)."""
import os
import re
from functools import partial

import pytest

import recipe_cli
from recipe_cli import BIN, USER_DIR, run

CONF = os.path.join(recipe_cli.REPO, "examples", "av_data2vec", "conf")
hydra_train = partial(recipe_cli.hydra_train, CONF)
TRAIN_LINE = re.compile(r"\[train_inner\].* loss=([0-9.]+).*target_var=([0-9.]+)")
WER_LINE = re.compile(r"WER: ([0-9.]+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("d2v") / "speech"
    run([os.path.join(BIN, "avplugins-synth"), "speech", "--out", str(out), "--num-clips", "40",
         "--seed", "5", "--workers", "2", "--valid-fraction", "0.05", "--test-fraction", "0.05"], timeout=300)
    return out


def test_pretraining_then_asr_then_audio_visual_fine_tuning_learns(corpus, tmp_path):
    pretrain_dir = tmp_path / "pretrain"
    log = hydra_train("pretrain", pretrain_dir, [
        f"task.data={corpus}", "optimization.max_update=40", "common.log_interval=5",
        "model.ema_anneal_end_step=40",
    ])
    losses, target_vars = zip(*[(float(a), float(b)) for a, b in TRAIN_LINE.findall(log)])
    assert len(losses) == 8, log[-2000:]
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    assert min(target_vars) > 0.1, target_vars  # no collapse

    finetune_dir = tmp_path / "asr"
    hydra_train("finetune", finetune_dir, [
        # the recipe's noise-augmented training needs more than these 250 updates on 36 utterances
        f"task.data={corpus}", "task.modalities=audio", "dataset.disable_validation=true", "task.noise_manifest=null",
        f"model.w2v_path={pretrain_dir}/checkpoint_last.pt", "optimization.max_update=250",
    ])
    os.remove(pretrain_dir / "checkpoint_last.pt")  # decoding needs only the fine-tuned checkpoint
    assert decode_train_wer(corpus, finetune_dir / "checkpoint_last.pt") < 35.0

    avsr_dir = tmp_path / "avsr"
    log = hydra_train("finetune", avsr_dir, [
        f"task.data={corpus}", "dataset.disable_validation=true", "model.w2v_path=null",
        f"checkpoint.finetune_from_model={finetune_dir}/checkpoint_last.pt", "optimization.max_update=40",
    ])
    assert f"Loaded checkpoint {finetune_dir}/checkpoint_last.pt (epoch" in log and "@ 0 updates)" in log, log[-3000:]
    assert "num_updates=40" in log or "num_updates 40" in log, log[-3000:]
    # 40 updates from fresh optimiser and schedule, half the utterances with babble and a quarter
    # without audio: the audio path learnt in the first stage must survive them
    assert decode_train_wer(corpus, avsr_dir / "checkpoint_last.pt") < 50.0


def decode_train_wer(corpus, checkpoint):
    """fairseq-generate's beam-5 WER of CHECKPOINT (audio input) on every training utterance."""
    log = run(
        [os.path.join(BIN, "fairseq-generate"), str(corpus), "--user-dir", USER_DIR, "--cpu",
         "--task", "av_speech_recognition", "--path", str(checkpoint), "--modalities", "audio",
         "--gen-subset", "train", "--beam", "5", "--scoring", "wer", "--post-process", "sentencepiece",
         "--batch-size", "16"],
        timeout=300,
    )
    hypotheses = [line for line in log.splitlines() if line.startswith("D-")]
    assert len(hypotheses) == 36, log[-3000:]  # every training utterance decoded
    return float(WER_LINE.findall(log)[-1])
