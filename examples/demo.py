"""The main job: both systems end to end on the synthetic corpora, reported like a paper.

    python examples/demo.py [--out demo_out] [--seed 0] [--device auto|cpu|cuda] [--jobs 2] [--quick] [--no-sparse]

Every step runs a public command a user would type (``avplugins-synth``,
``python -m preprocess.*``, ``fairseq-hydra-train``, ``fairseq-validate``, ``fairseq-generate``,
``avsync``), logs it to ``OUT/logs/<step>.log`` and leaves a ``.done`` marker, so a second run
reuses what exists. The one step that is not a command, shifting test clips by known offsets,
calls the public ``avplugins.data.media.write_shifted_copy`` in-process (what ``avsync shift``
and ``avsync predict --fix`` run; one process instead of one per copy).

Chains of steps, two steps at a time (``--jobs 2``, one CPU thread per process on a
2-core machine):
- Synchformer on ``speech_long`` (9-11 s speech clips) and on ``sparse`` (10 s scenes with rare
  events; ``--no-sparse`` leaves it out): corpus, fixed test offsets, stage 1, tower-feature cache, stage 2,
  ``fairseq-validate`` on the fixed-offset test set, ``avsync predict`` on test clips shifted by
  known offsets;
- AV-data2vec on ``speech`` (2-4 s utterances): corpus, pre-training, an ASR fine-tune, from
  it a fine-tune on audio+video with modality dropout and babble, ``fairseq-generate`` of the
  latter as ASR, VSR and AVSR, clean and in babble noise.
At the end one results table is printed and written, with the plots, to ``OUT/results/``.
The demo's schedules (shorter than the recipes') are the command-line overrides in SCHEDULES.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SYNC_CONF = os.path.join(REPO, "examples", "synchformer", "conf")
D2V_CONF = os.path.join(REPO, "examples", "av_data2vec", "conf")

# Every demo-specific schedule in one place: per mode, per step, the arguments added to the
# step's command (Hydra overrides for training, options for the other commands). The recipes
# keep their own defaults for everything not named here.
SCHEDULES: Dict[str, Dict[str, list]] = {
    "full": {
        # avplugins-synth sizes; speech is AV-data2vec's (at the 32 px its tiny recipes read; its
        # WERs fall with every added clip: 2000 is what the budget allows), Synchformer needs >= 9 s clips
        "corpus_speech": ["--num-clips", "2000", "--image-size", "32", "--valid-fraction", "0.05",
                          "--test-fraction", "0.05"],
        # Synchformer's corpora at the frame size its tiny recipes decode (48 px): 2-3x faster to make
        "corpus_speech_long": ["--num-clips", "400", "--min-duration", "9", "--max-duration", "11",
                               "--image-size", "48"],
        "corpus_sparse": ["--num-clips", "300", "--image-size", "48"],
        # both stages as their recipes (1500 and 1000 updates)
        "sync_stage1": ["common.log_interval=25"],
        "sync_stage2": ["common.log_interval=25"],
        "d2v_pretrain": ["common.log_interval=10"],  # the recipe's 300 updates
        # the recipe's two fine-tunes, shorter: ASR on audio alone (cheap steps that align the
        # decoder), then from it one audio+video model with modality dropout and babble, which
        # also decodes from one stream
        "d2v_asr": ["optimization.max_update=1500", "common.log_interval=10"],
        "d2v_finetune": ["optimization.max_update=1000", "common.log_interval=10"],
        # hypotheses at most 0.2 pieces per 25 Hz frame + 5 (about 3x the corpus' speaking rate):
        # fairseq's default (200) lets a confused decoder babble for 200 pieces under noise
        "generate": ["--beam", "5", "--batch-size", "16", "--max-len-a", "0.2", "--max-len-b", "5"],
        # test clips shifted by known offsets for avsync predict: how many clips, which offsets
        "shift_clips": [2],
        "shift_offsets_s": [-2.0, -1.6, -1.2, -0.8, -0.4, 0.0, 0.4, 0.8, 1.2, 1.6, 2.0],
        "snr_db": [None, 5, 0],  # None: clean
    },
    "quick": {  # a smoke test of every step: a few updates on a few clips; numbers meaningless
        "corpus_speech": ["--num-clips", "16"],
        "corpus_speech_long": ["--num-clips", "6", "--min-duration", "9", "--max-duration", "10"],
        "corpus_sparse": ["--num-clips", "6"],
        "sync_stage1": ["optimization.max_update=2", "dataset.batch_size=4", "common.log_interval=1",
                        "dataset.validate_interval_updates=2", "checkpoint.save_interval_updates=2"],
        "sync_stage2": ["optimization.max_update=2", "dataset.batch_size=4", "common.log_interval=1",
                        "dataset.validate_interval_updates=2", "checkpoint.save_interval_updates=2"],
        # tri_stage needs >= 1 update in its last phase (0.3 or 0.4 of max_update)
        "d2v_pretrain": ["optimization.max_update=4", "model.ema_anneal_end_step=4", "common.log_interval=1"],
        "d2v_asr": ["optimization.max_update=4", "common.log_interval=1", "dataset.validate_interval=1"],
        "d2v_finetune": ["optimization.max_update=4", "common.log_interval=1", "dataset.validate_interval=1"],
        "generate": ["--beam", "2", "--batch-size", "16", "--max-len-b", "12"],
        "shift_clips": [1],
        "shift_offsets_s": [-1.0, 0.0, 1.0],
        "snr_db": [None, 0],
    },
}
SYNC_CORPORA = ("speech_long", "sparse")  # --no-sparse runs the first only
MODALITIES = {"ASR": "audio", "VSR": "video", "AVSR": "audio,video"}


def tool(name: str) -> str:
    """A console script of this environment (the venv's bin folder), else from PATH."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


@dataclass
class Step:
    """One step of the demo: a ``command`` to run, or (for the one non-command step) an
    ``action`` called with the step's log file; ``done`` when its marker exists from an earlier
    run and its ``outputs`` are still there."""

    name: str
    command: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    action: Optional[Callable] = None
    summary: str = ""  # what an ``action`` step does, for the terminal


class StepFailed(RuntimeError):
    pass


class Runner:
    """Runs steps (from several threads at once), each logged to ``OUT/logs/<step>.log``."""

    def __init__(self, out_dir: str, env: Dict[str, str]):
        self.out_dir = out_dir
        self.log_dir = os.path.join(out_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.env = env
        self.timings: Dict[str, float] = {}
        self._print_lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._print_lock:
            print(text, flush=True)

    def marker(self, step: Step) -> str:
        return os.path.join(self.log_dir, f"{step.name}.done")

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def run(self, step: Step) -> str:
        """Run ``step`` unless an earlier run finished it; returns its log path.
        Raises StepFailed with the tail of the log when it fails."""
        log_path = self.log_path(step.name)
        if os.path.exists(self.marker(step)) and all(os.path.exists(p) for p in step.outputs):
            self.say(f"[demo] {step.name}: reusing the result of an earlier run ({log_path})")
            return log_path
        what = " ".join(shlex.quote(part) for part in step.command) if step.command else step.summary
        self.say(f"[demo] {step.name}: {what}")
        started = time.time()
        with open(log_path, "w") as log:
            if step.action is not None:
                returncode = self._call(step, log)
            else:
                returncode = self._execute(step, log)
        self.timings[step.name] = time.time() - started
        if returncode != 0:
            tail = open(log_path).read().splitlines()[-25:]
            raise StepFailed(
                f"[demo] step {step.name} failed (exit {returncode}); its log is {log_path}:\n" + "\n".join(tail)
            )
        missing = [p for p in step.outputs if not os.path.exists(p)]
        if missing:
            raise StepFailed(f"[demo] step {step.name} finished but did not write {missing}; see {log_path}")
        open(self.marker(step), "w").write(f"{self.timings[step.name]:.1f} s\n")
        self.say(f"[demo] {step.name}: done in {self.timings[step.name]:.0f} s")
        return log_path

    def _execute(self, step: Step, log) -> int:
        log.write("$ " + " ".join(shlex.quote(part) for part in step.command) + "\n")
        # text mode reads tqdm's carriage returns as line ends: one line per progress update
        process = subprocess.Popen(
            step.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, cwd=REPO, bufsize=1,
        )
        last_progress = 0.0
        for line in process.stdout:
            log.write(line)
            if _is_progress_bar(line):
                if time.time() - last_progress < 10 and "100%" not in line:
                    continue
                last_progress = time.time()
            else:
                line = _evaluation_summary(line) or line
                if not _worth_showing(line):
                    continue
            self.say(f"    [{step.name}] {line.strip()[:150]}")
        return process.wait()

    def _call(self, step: Step, log) -> int:
        try:
            step.action(log)
            return 0
        except Exception as error:  # reported like a failed command: log tail, step name
            log.write(f"{type(error).__name__}: {error}\n")
            return 1


def _is_progress_bar(line: str) -> bool:
    return "%|" in line


def _worth_showing(line: str) -> bool:
    """Progress worth echoing to the terminal: evaluation results, WER, errors, summaries."""
    return bool(re.search(r"^(valid|test) on|WER|Error|error:|clips in|: offset ", line))


def _evaluation_summary(line: str) -> Optional[str]:
    """``valid on update 250: loss 2.9 accuracy_1 0.41 ...`` for a line of fairseq's JSON log
    that holds a validation (training) or test (``fairseq-validate``) record; else None."""
    start = line.find("{\"")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    subset = next((key.split("_")[0] for key in record if key.startswith(("valid_", "test_"))), None)
    if subset is None:
        return None
    shown = [f"{key[len(subset) + 1:]} {value}" for key, value in record.items()
             if key.startswith(subset + "_") and not key.endswith(("_wall", "_bsz", "_num_updates"))]
    update = record.get(f"{subset}_num_updates")
    return f"{subset} on " + (f"update {update}: " if update else "the test set: ") + " ".join(shown)


def run_chains(runner: Runner, chains: List[List[Step]], jobs: int) -> None:
    """Run the chains (lists of steps that must run in order) with ``jobs`` steps at a time:
    a free worker takes the next step of the idle chain with the most steps left. A failing
    chain stops; the others go on (their steps are then reusable). Raises StepFailed naming
    every failure."""
    pending = [list(chain) for chain in chains]
    busy: set = set()
    errors: List[str] = []
    condition = threading.Condition()

    def next_chain() -> Optional[int]:
        idle = [index for index, chain in enumerate(pending) if chain and index not in busy]
        return max(idle, key=lambda index: len(pending[index])) if idle else None

    def worker() -> None:
        while True:
            with condition:
                while (index := next_chain()) is None and busy:
                    condition.wait()
                if index is None:
                    return
                busy.add(index)
                step = pending[index].pop(0)
            try:
                runner.run(step)
            except StepFailed as error:
                errors.append(str(error))
                pending[index].clear()
            finally:
                with condition:
                    busy.discard(index)
                    condition.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise StepFailed("\n\n".join(errors))


# ---------------------------------------------------------------------------------------------
# the steps


@dataclass
class Context:
    """What every step builder needs: where things go, the device, the schedules."""

    out_dir: str
    seed: int
    device: str  # "cpu" or "cuda"
    schedule: Dict[str, list]
    workers: int  # avplugins-synth processes
    sync_corpora: Tuple[str, ...] = ("speech_long",)  # Synchformer chains, in SYNC_CORPORA

    def path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    @property
    def user_dir(self) -> str:
        return os.path.join(REPO, "avplugins")

    def train_command(self, conf_dir: str, schedule_key: str, step_name: str, overrides: List[str]) -> List[str]:
        """``fairseq-hydra-train`` on a tiny recipe with the demo's overrides: JSON logs (parsed
        for the training curves), Hydra's output folder under OUT/hydra, the device."""
        return [
            tool("fairseq-hydra-train"), "--config-dir", conf_dir, "--config-name", "tiny_synthetic",
            f"common.user_dir={self.user_dir}", f"common.cpu={str(self.device == 'cpu').lower()}",
            "common.log_format=json", f"hydra.run.dir={self.path('hydra', step_name)}",
            *overrides, *self.schedule[schedule_key],
        ]

    def cpu_flag(self) -> List[str]:
        return ["--cpu"] if self.device == "cpu" else []


def recipe_task_value(recipe: str, key: str):
    """``task.<key>`` of a recipe yaml, so the demo's other commands follow a retuned recipe."""
    from omegaconf import OmegaConf

    return OmegaConf.load(recipe).task[key]


def corpus_step(ctx: Context, name: str) -> Step:
    corpus_dir = ctx.path("data", name)
    kind = "sparse" if name == "sparse" else "speech"
    return Step(
        f"corpus_{name}",
        [tool("avplugins-synth"), kind, *ctx.schedule[f"corpus_{name}"], "--out", corpus_dir,
         "--seed", str(ctx.seed), "--workers", str(ctx.workers)],
        [os.path.join(corpus_dir, "corpus.json")],
    )


@dataclass
class SyncPaths:
    data: str
    decoded: str
    stage1: str
    cache: str
    stage2: str
    shifted: str
    predictions: str

    @classmethod
    def of(cls, ctx: Context, corpus: str) -> "SyncPaths":
        run = ctx.path("synchformer", corpus)
        return cls(ctx.path("data", corpus), os.path.join(run, "decoded"), os.path.join(run, "stage1"),
                   os.path.join(run, "features"), os.path.join(run, "stage2"), os.path.join(run, "shifted"),
                   os.path.join(run, "predict.json"))


def synchformer_steps(ctx: Context, corpus: str) -> List[Step]:
    """Stage 1, feature cache, stage 2, test-set evaluation and offset prediction on ``corpus``."""
    paths = SyncPaths.of(ctx, corpus)
    short_side = recipe_task_value(os.path.join(SYNC_CONF, "pretrain", "tiny_synthetic.yaml"), "resize_short_side")
    stage1_ckpt = os.path.join(paths.stage1, "checkpoint_last.pt")
    stage2_ckpt = os.path.join(paths.stage2, "checkpoint_best.pt")
    module = [sys.executable, "-m"]
    shift = ShiftedClips(paths, ctx.schedule["shift_clips"][0], ctx.schedule["shift_offsets_s"])
    return [
        Step(f"sync_offsets_{corpus}", [*module, "preprocess.sync_offsets", paths.data, "--splits", "valid", "test",
                                        "--seed", str(ctx.seed)],
             [os.path.join(paths.data, "test_offsets.csv")]),
        Step(f"sync_decode_{corpus}", [*module, "preprocess.cache_sync_features", "decode", paths.data, paths.decoded,
                                       "--splits", "train", "valid", "--resize-short-side", str(short_side)],
             [paths.decoded]),
        Step(f"sync_stage1_{corpus}", ctx.train_command(
            os.path.join(SYNC_CONF, "pretrain"), "sync_stage1", f"sync_stage1_{corpus}",
            [f"task.data={paths.data}", f"task.decoded_clips={paths.decoded}", f"checkpoint.save_dir={paths.stage1}"]),
             [stage1_ckpt]),
        Step(f"sync_features_{corpus}", [*module, "preprocess.cache_sync_features", "features", stage1_ckpt,
                                         paths.data, paths.cache, "--splits", "train", "valid",
                                         "--decoded", paths.decoded, "--device", ctx.device],
             [paths.cache]),
        Step(f"sync_stage2_{corpus}", ctx.train_command(
            os.path.join(SYNC_CONF, "sync"), "sync_stage2", f"sync_stage2_{corpus}",
            [f"task.data={paths.data}", f"task.feature_cache={paths.cache}",
             f"model.pretrained_towers={stage1_ckpt}", f"checkpoint.save_dir={paths.stage2}"]),
             [stage2_ckpt]),
        Step(f"sync_test_{corpus}", [tool("fairseq-validate"), paths.data, "--user-dir", ctx.user_dir,
                                     "--task", "av_sync", "--path", stage2_ckpt, "--valid-subset", "test",
                                     "--batch-size", "16", "--log-format", "json",
                                     "--model-overrides", "{'feature_cache': None}", *ctx.cpu_flag()]),
        Step(f"sync_shift_{corpus}", action=shift, outputs=[shift.truth_path],
             summary="shift test clips by known offsets (write_shifted_copy, as `avsync shift` does)"),
        Step(f"sync_predict_{corpus}", [tool("avsync"), "predict", *shift.videos(),
                                        "--checkpoint", stage2_ckpt, "--device", ctx.device,
                                        "--json", paths.predictions,
                                        "--plot", os.path.join(paths.shifted, "offsets.png")],
             [paths.predictions]),
    ]


class ShiftedClips:
    """Copies of the first test clips with the audio moved by known offsets (positive: audio
    early, avsync's convention), for ``avsync predict`` and the offset confusion matrix."""

    def __init__(self, paths: SyncPaths, num_clips: int, offsets_s: List[float]):
        self.paths, self.num_clips, self.offsets_s = paths, num_clips, offsets_s
        self.truth_path = os.path.join(paths.shifted, "truth.json")

    def videos(self) -> List[str]:
        """The shifted copies' paths, named by test clip number and offset (the command line
        needs them before the corpus exists)."""
        return [os.path.join(self.paths.shifted, f"test{clip}_shift{offset_s:+.1f}s.mp4")
                for clip in range(self.num_clips) for offset_s in self.offsets_s]

    def plan(self) -> Dict[str, dict]:
        """{shifted copy: {"source", "offset_s"}}; reads the test manifest."""
        from avplugins.data.manifest import read_manifest

        manifest = os.path.join(self.paths.data, "test.tsv")
        _, entries = read_manifest(manifest)
        if len(entries) < self.num_clips:
            raise ValueError(f"{manifest}: {len(entries)} clips, the demo shifts {self.num_clips}; "
                             "generate more clips or lower shift_clips in SCHEDULES")
        sources = [entry.video_path for entry in entries[: self.num_clips] for _ in self.offsets_s]
        offsets = [offset_s for _ in range(self.num_clips) for offset_s in self.offsets_s]
        return {video: {"source": source, "offset_s": offset_s}
                for video, source, offset_s in zip(self.videos(), sources, offsets)}

    def __call__(self, log) -> None:
        """Write the shifted copies and ``truth.json`` ({copy: {"source", "offset_s"}})."""
        from avplugins.data.media import write_shifted_copy

        os.makedirs(self.paths.shifted, exist_ok=True)
        plan = self.plan()
        for video, item in plan.items():
            # audio early by o = audio delayed by -o
            write_shifted_copy(item["source"], video, delay_s=-item["offset_s"])
            log.write(f"{video}: {item['source']} with the audio {item['offset_s']:+.1f} s early\n")
        with open(self.truth_path, "w") as handle:
            json.dump(plan, handle, indent=1)


@dataclass
class D2VPaths:
    data: str
    pretrain: str
    asr: str
    finetune: str
    decode: str

    @classmethod
    def of(cls, ctx: Context) -> "D2VPaths":
        run = ctx.path("av_data2vec")
        return cls(ctx.path("data", "speech"), os.path.join(run, "pretrain"), os.path.join(run, "asr"),
                   os.path.join(run, "finetune"), os.path.join(run, "decode"))


def snr_name(snr_db: Optional[float]) -> str:
    return "clean" if snr_db is None else f"{snr_db:g}dB"


def decode_conditions(ctx: Context) -> List[tuple]:
    """(system, SNR) pairs to decode: ASR and AVSR at every SNR, VSR clean (the audio noise
    does not reach a video-only model)."""
    return [(system, snr) for system in MODALITIES for snr in ctx.schedule["snr_db"]
            if system != "VSR" or snr is None]


def av_data2vec_steps(ctx: Context) -> List[Step]:
    """Pre-training, the ASR fine-tune, from it the audio+video fine-tune with modality dropout
    and babble, and the latter's decoding."""
    paths = D2VPaths.of(ctx)
    pretrain_ckpt = os.path.join(paths.pretrain, "checkpoint_last.pt")
    asr_ckpt = os.path.join(paths.asr, "checkpoint_last.pt")
    finetune_ckpt = os.path.join(paths.finetune, "checkpoint_last.pt")
    finetune_recipe = os.path.join(D2V_CONF, "finetune", "tiny_synthetic.yaml")
    frames = ["--image-size", str(recipe_task_value(finetune_recipe, "image_size")),
              "--crop-size", str(recipe_task_value(finetune_recipe, "crop_size"))]
    steps = [
        Step("d2v_pretrain", ctx.train_command(
            os.path.join(D2V_CONF, "pretrain"), "d2v_pretrain", "d2v_pretrain",
            [f"task.data={paths.data}", f"checkpoint.save_dir={paths.pretrain}"]), [pretrain_ckpt]),
        Step("d2v_asr", ctx.train_command(
            os.path.join(D2V_CONF, "finetune"), "d2v_asr", "d2v_asr",
            [f"task.data={paths.data}", "task.modalities=audio", "task.noise_manifest=null",
             f"model.w2v_path={pretrain_ckpt}", f"checkpoint.save_dir={paths.asr}"]), [asr_ckpt]),
        Step("d2v_finetune", ctx.train_command(
            os.path.join(D2V_CONF, "finetune"), "d2v_finetune", "d2v_finetune",
            [f"task.data={paths.data}", "task.modalities='audio,video'", "model.w2v_path=null",
             f"checkpoint.finetune_from_model={asr_ckpt}", f"checkpoint.save_dir={paths.finetune}"]),
             [finetune_ckpt]),
    ]
    for system, snr_db in decode_conditions(ctx):
        results = os.path.join(paths.decode, f"{system}_{snr_name(snr_db)}")
        noise = [] if snr_db is None else ["--noise-manifest", os.path.join(paths.data, "train.tsv"),
                                           "--noise-snr-db", f"{snr_db:g}", "--noise-babble-voices", "3"]
        steps.append(Step(
            f"d2v_decode_{system}_{snr_name(snr_db)}",
            [tool("fairseq-generate"), paths.data, "--user-dir", ctx.user_dir, "--task", "av_speech_recognition",
             "--path", finetune_ckpt, "--gen-subset", "test", "--modalities", MODALITIES[system], *frames,
             "--scoring", "wer", "--post-process", "sentencepiece", "--results-path", results,
             *ctx.schedule["generate"], *noise, *ctx.cpu_flag()],
            [os.path.join(results, "generate-test.txt")],
        ))
    return steps


# ---------------------------------------------------------------------------------------------
# results: parsed from the steps' logs and outputs


def fairseq_json_records(log_path: str) -> List[dict]:
    """Every JSON object fairseq's ``json`` log format wrote into ``log_path`` (one per line,
    after the logger's prefix)."""
    records = []
    for line in open(log_path, errors="replace"):
        start = line.find("{\"")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def training_curves(log_path: str) -> Dict[str, List[tuple]]:
    """{metric: [(update, value)]} from a fairseq-hydra-train JSON log: ``train_*`` from the
    periodic training records, ``valid_*`` from the validations."""
    curves: Dict[str, List[tuple]] = {}
    for record in fairseq_json_records(log_path):
        if "num_updates" in record:
            prefix, update = "train_", record["num_updates"]
        elif "valid_num_updates" in record:
            prefix, update = "", record["valid_num_updates"]
        else:
            continue
        for key, value in record.items():
            name = key if key.startswith("valid_") else prefix + key
            if key in ("epoch", "update", "num_updates", "valid_num_updates"):
                continue
            try:
                curves.setdefault(name, []).append((int(float(update)), float(value)))
            except (TypeError, ValueError):
                continue
    return curves


def validate_metrics(log_path: str) -> Dict[str, float]:
    """acc@1, acc@1 +-1 class and acc@5 (in %) and the clip count from ``fairseq-validate``'s
    JSON log of the av_sync task."""
    for record in reversed(fairseq_json_records(log_path)):
        found = {}
        for key, value in record.items():
            for metric in ("accuracy_1_tol", "accuracy_1", "accuracy_5"):
                if key.endswith(metric) and metric not in found:
                    found[metric] = 100 * float(value)
                    break
        if "accuracy_1" in found:
            return found
    raise ValueError(f"{log_path}: no accuracy_1 in fairseq-validate's output; see the log")


def generated_wer(results_dir: str) -> Dict[str, float]:
    """WER (%) and the utterance count from ``fairseq-generate``'s ``generate-test.txt``."""
    path = os.path.join(results_dir, "generate-test.txt")
    text = open(path).read()
    match = re.search(r"WER: ([\d.]+)", text)
    if match is None:
        raise ValueError(f"{path}: no 'WER:' line; see the decode log")
    return {"wer": float(match.group(1)), "utterances": len(re.findall(r"^H-\d+", text, flags=re.MULTILINE))}


def chance_accuracies(num_classes: int) -> Dict[str, float]:
    """acc@1 and acc@1 +-1 class (in %) of a uniform random guess over ``num_classes`` offsets
    with a uniform true offset (the grid's end classes have one neighbour)."""
    within_one = sum(min(c + 1, num_classes - 1) - max(c - 1, 0) + 1 for c in range(num_classes))
    return {"accuracy_1": 100 / num_classes, "accuracy_1_tol": 100 * within_one / num_classes ** 2}


def constant_guess_wer(data_dir: str) -> Dict[str, object]:
    """The best transcript-free baseline on the test set: WER (%) of answering every utterance
    with the most frequent training word repeated k times, for the best k (k = 0 is the empty
    answer, 100 %)."""
    import editdistance

    train = [line.split() for line in open(os.path.join(data_dir, "train.wrd"))]
    test = [line.split() for line in open(os.path.join(data_dir, "test.wrd"))]
    word = Counter(w for words in train for w in words).most_common(1)[0][0]
    num_words = sum(len(words) for words in test)

    def wer(k):
        return 100 * sum(editdistance.eval([word] * k, words) for words in test) / num_words

    best_k = min(range(0, max(len(words) for words in test) + 1), key=wer)
    return {"word": word, "repeats": best_k, "wer": wer(best_k)}


def shift_predictions(paths: SyncPaths):
    """([{"video", "truth_s", "estimate_s", "confidence", "plot"}], the offset grid in seconds)
    from avsync's JSON report and the demo's truth.json."""
    truth = json.load(open(os.path.join(paths.shifted, "truth.json")))
    report = json.load(open(paths.predictions))
    rows = []
    for video in report["videos"]:
        rows.append({"video": video["path"], "truth_s": truth[video["path"]]["offset_s"],
                     "estimate_s": video.get("estimate_s"), "confidence": video.get("confidence"),
                     "plot": video.get("plot")})
    return rows, [round(x, 6) for x in report["grid_s"]]


def step_seconds(log_dir: str) -> Dict[str, float]:
    """{step: seconds it took} from the ``.done`` markers (the run that did the work)."""
    seconds = {}
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(".done"):
            seconds[name[: -len(".done")]] = float(open(os.path.join(log_dir, name)).read().split()[0])
    return seconds


def example_prediction(rows: List[dict]) -> dict:
    """The shifted clip shown as the example: the first one whose true offset is non-zero and
    strictly inside the grid's range, chosen by the truth only, never by how well it was predicted."""
    largest = max(abs(row["truth_s"]) for row in rows)
    return next((row for row in rows if 0 < abs(row["truth_s"]) < largest), rows[0])


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_training_curves(runs: Dict[str, Dict[str, List[tuple]]], path: str) -> None:
    """One panel per training run: training loss over updates, and its validation metrics."""
    columns = 3
    rows = -(-len(runs) // columns)
    figure = new_figure(4.5 * columns, 3.3 * rows)
    for index, (title, curves) in enumerate(runs.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for name in ("train_loss", "valid_loss"):
            if curves.get(name):
                updates, values = zip(*curves[name])
                axes.plot(updates, values, marker="." if name.startswith("valid") else None, label=name)
        axes.set_xlabel("update")
        axes.set_ylabel("loss")
        accuracy = [n for n in ("valid_accuracy_1", "valid_accuracy", "train_accuracy") if curves.get(n)]
        if accuracy:
            twin = axes.twinx()
            updates, values = zip(*curves[accuracy[0]])
            twin.plot(updates, values, color="tab:green", marker=".", label=accuracy[0])
            twin.set_ylabel(accuracy[0], color="tab:green")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7, loc="upper right")
    figure.savefig(path, dpi=100)


def plot_confusion(rows: List[dict], grid: List[float], title: str, path: str) -> None:
    """Counts of (true offset, estimated offset) over the grid's classes."""
    import numpy as np

    from avplugins.data.sync_sampling import offset_to_class

    counts = np.zeros((len(grid), len(grid)), dtype=int)
    for row in rows:
        if row["estimate_s"] is not None:
            counts[offset_to_class(row["truth_s"], grid), offset_to_class(row["estimate_s"], grid)] += 1
    figure = new_figure(6, 5.2)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", origin="lower")
    axes.plot([0, len(grid) - 1], [0, len(grid) - 1], color="grey", linewidth=0.5, linestyle=":")
    labels = [f"{g:+.1f}" for g in grid]
    axes.set_xticks(range(len(grid)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(grid)), labels, fontsize=7)
    axes.set_xlabel("estimated offset (s)")
    axes.set_ylabel("true offset (s)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="clips")
    figure.savefig(path, dpi=100)


def plot_wer_per_snr(wer: Dict[str, Dict[str, float]], snrs: List[Optional[float]], baseline: float, path: str):
    """WER over SNR, one line per system (the clean condition at the right)."""
    order = sorted((s for s in snrs if s is not None)) + [None]
    figure = new_figure(5.5, 4)
    axes = figure.add_subplot()
    positions = range(len(order))
    for system, by_snr in wer.items():
        values = [by_snr.get(snr_name(s), by_snr.get("clean") if system == "VSR" else None) for s in order]
        axes.plot(positions, values, marker="o", label=f"{system} ({MODALITIES[system]})",
                  linestyle="--" if system == "VSR" else "-")
    axes.axhline(baseline, color="grey", linestyle=":", label="best constant guess")
    axes.set_xticks(list(positions), [snr_name(s).replace("dB", " dB") for s in order])
    axes.set_xlabel("babble noise SNR")
    axes.set_ylabel("WER (%)")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.set_title("AV-data2vec (tiny) on the synthetic speech test set", fontsize=9)
    figure.savefig(path, dpi=100)


def build_results(ctx: Context, runner: Runner) -> str:
    """Parse every step's output into results.json, the plots and results.md; returns the table."""
    from avplugins.data.sync_sampling import offset_grid

    results_dir = ctx.path("results")
    sync_recipe = os.path.join(SYNC_CONF, "sync", "tiny_synthetic.yaml")
    num_classes = recipe_task_value(sync_recipe, "num_offset_classes")
    chance = chance_accuracies(num_classes)
    results: dict = {"mode": "quick" if ctx.schedule is SCHEDULES["quick"] else "full",
                     "synchformer": {}, "av_data2vec": {}}
    curves = {}
    for corpus in ctx.sync_corpora:
        paths = SyncPaths.of(ctx, corpus)
        metrics = validate_metrics(runner.log_path(f"sync_test_{corpus}"))
        rows, grid = shift_predictions(paths)
        assert len(grid) == num_classes and list(grid) == list(offset_grid(grid[-1], num_classes))
        results["synchformer"][corpus] = {"test": metrics, "chance": chance, "predictions": rows}
        plot_confusion(rows, grid, f"Synchformer (tiny) on {corpus}: avsync predict on shifted test clips",
                       os.path.join(results_dir, f"offset_confusion_{corpus}.png"))
        example = example_prediction(rows)
        if example.get("plot"):
            shutil.copyfile(example["plot"], os.path.join(results_dir, f"avsync_predict_{corpus}.png"))
        for stage in ("stage1", "stage2"):
            curves[f"Synchformer {stage}, {corpus}"] = training_curves(runner.log_path(f"sync_{stage}_{corpus}"))
    d2v = D2VPaths.of(ctx)
    for name in ("pretrain", "asr", "finetune"):
        curves[f"AV-data2vec {name}"] = training_curves(runner.log_path(f"d2v_{name}"))
    wer: Dict[str, Dict[str, float]] = {}
    for system, snr_db in decode_conditions(ctx):
        decoded = generated_wer(os.path.join(d2v.decode, f"{system}_{snr_name(snr_db)}"))
        wer.setdefault(system, {})[snr_name(snr_db)] = decoded["wer"]
        results["av_data2vec"]["utterances"] = decoded["utterances"]
    baseline = constant_guess_wer(d2v.data)
    results["av_data2vec"].update({"wer": wer, "constant_guess_baseline": baseline})
    results["training_curves"] = curves
    results["step_seconds"] = step_seconds(runner.log_dir)
    plot_training_curves(curves, os.path.join(results_dir, "training_curves.png"))
    plot_wer_per_snr(wer, ctx.schedule["snr_db"], baseline["wer"], os.path.join(results_dir, "wer_per_snr.png"))
    with open(os.path.join(results_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    table = results_table(results, ctx.schedule["snr_db"], num_classes)
    with open(os.path.join(results_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    return table


def results_table(results: dict, snrs: List[Optional[float]], num_classes: int) -> str:
    """The paper-style table (markdown) of results.json."""
    lines = []
    if results["mode"] == "quick":
        lines += ["**--quick run: a smoke test of the pipeline; the numbers mean nothing.**", ""]
    lines += [f"### Synchformer (tiny): offset classification, {num_classes} classes over -2..+2 s, "
              "fixed-offset test sets (fairseq-validate)", "",
              "| corpus | acc@1 (%) | acc@1 +-1 class (%) | acc@5 (%) |", "|---|---|---|---|"]
    chance = None
    for corpus, entry in results["synchformer"].items():
        test, chance = entry["test"], entry["chance"]
        lines.append(f"| {corpus} | {test['accuracy_1']:.1f} | {test.get('accuracy_1_tol', float('nan')):.1f} "
                     f"| {test.get('accuracy_5', float('nan')):.1f} |")
    lines.append(f"| chance | {chance['accuracy_1']:.1f} | {chance['accuracy_1_tol']:.1f} "
                 f"| {100 * 5 / num_classes:.1f} |")
    lines += ["", "`avsync predict` on test clips shifted by known offsets (audio early by the true offset):", "",
              "| corpus | shifted clips | exact | within +-1 class | example: truth -> estimate |",
              "|---|---|---|---|---|"]
    for corpus, entry in results["synchformer"].items():
        rows = entry["predictions"]
        step = 4.0 / (num_classes - 1)
        exact = sum(r["estimate_s"] is not None and abs(r["estimate_s"] - r["truth_s"]) < step / 2 for r in rows)
        near = sum(r["estimate_s"] is not None and abs(r["estimate_s"] - r["truth_s"]) < 1.5 * step for r in rows)
        example = example_prediction(rows)
        lines.append(f"| {corpus} | {len(rows)} | {exact} | {near} | {example['truth_s']:+.1f} s -> "
                     f"{example['estimate_s']:+.1f} s (confidence {example['confidence']:.2f}) |")
    order = [None] + sorted((s for s in snrs if s is not None), reverse=True)
    d2v = results["av_data2vec"]
    lines += ["", f"### AV-data2vec (tiny): WER (%) on the speech test set ({d2v['utterances']} utterances), "
              "the audio+video fine-tune decoded from each input (fairseq-generate, no LM)", "",
              "| system (input) | " + " | ".join(snr_name(s).replace("dB", " dB babble") for s in order) + " |",
              "|---|" + "---|" * len(order)]
    for system, by_snr in d2v["wer"].items():
        cells = [f"{by_snr[snr_name(s)]:.1f}" if snr_name(s) in by_snr else "(= clean)" for s in order]
        lines.append(f"| {system} ({MODALITIES[system]}) | " + " | ".join(cells) + " |")
    baseline = d2v["constant_guess_baseline"]
    constant = (f"repeating \"{baseline['word']}\" {baseline['repeats']} times scores {baseline['wer']:.1f} %"
                if baseline["repeats"] else "no repetition of the commonest word does better")
    lines += ["", f"Baseline without input: the empty answer scores 100 % WER; {constant}. "
              "Babble: 3 other training utterances summed, mixed at the given SNR, the same noise in every run; "
              "VSR reads only the video, which the noise does not reach."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def choose_device(requested: str) -> str:
    """``auto``: cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[demo] --device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return requested


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="output folder (reused by a second run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--jobs", type=int, default=2,
                        help="steps run side by side; each process then gets cpu_count / jobs threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="a few updates on a few clips: a smoke test of every step in minutes")
    parser.add_argument("--no-sparse", action="store_true",
                        help="leave out Synchformer on the sparse corpus (about 6 minutes less on 2 cores; "
                             "ignored with --quick)")
    args = parser.parse_args(argv)

    started = time.time()
    out_dir = os.path.abspath(args.out)
    device = choose_device(args.device)
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    runner = Runner(out_dir, env)
    sync_corpora = SYNC_CORPORA[:1] if args.no_sparse and not args.quick else SYNC_CORPORA
    ctx = Context(out_dir, args.seed, device, SCHEDULES["quick" if args.quick else "full"], workers=threads,
                  sync_corpora=sync_corpora)
    os.makedirs(ctx.path("results"), exist_ok=True)
    runner.say(f"[demo] device {device}; {jobs} step(s) at a time, {threads} thread(s) per process; "
               f"output in {out_dir}")

    chains = [[corpus_step(ctx, "speech"), *av_data2vec_steps(ctx)]]
    chains += [[corpus_step(ctx, corpus), *synchformer_steps(ctx, corpus)] for corpus in ctx.sync_corpora]
    try:
        run_chains(runner, chains, jobs)
    except StepFailed as error:
        raise SystemExit(str(error))
    corpora = "\n\n".join(corpus_report(name, ctx.path("data", name)) for name in ("speech", *ctx.sync_corpora))
    with open(ctx.path("results", "corpora.txt"), "w") as handle:
        handle.write(corpora + "\n")
    table = build_results(ctx, runner)
    print("\n" + table)
    print(f"\n[demo] results, plots and the corpus statistics in {ctx.path('results')} "
          f"({time.time() - started:.0f} s)")


def corpus_report(name: str, corpus_dir: str) -> str:
    """The generator's own statistics table for a finished corpus."""
    from preprocess.synthetic import format_stats

    corpus = json.load(open(os.path.join(corpus_dir, "corpus.json")))
    return f"[{name}] " + format_stats(corpus["arguments"]["kind"], corpus_dir, corpus["stats"])


if __name__ == "__main__":
    main()
