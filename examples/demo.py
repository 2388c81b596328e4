"""The main job: both systems end to end on the synthetic corpora, reported like a paper.

    python examples/demo.py [--out demo_out] [--seed 0]

Every step runs a public command a user would type (``avplugins-synth``,
``python -m preprocess.*``, ``fairseq-hydra-train``, ``fairseq-validate``, ``fairseq-generate``,
``avsync``), logs it to ``OUT/logs/<step>.log`` and leaves a ``.done`` marker, so a second run
reuses what exists. At the end one results table is printed and written, with the plots, to
``OUT/results/``.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """A console script of this environment (the venv's bin folder), else from PATH."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


@dataclass
class Step:
    """One command of the demo; ``done`` when its marker exists from an earlier run."""

    name: str
    command: List[str]
    outputs: List[str] = field(default_factory=list)


class Runner:
    def __init__(self, out_dir: str, env: Dict[str, str]):
        self.out_dir = out_dir
        self.log_dir = os.path.join(out_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.env = env
        self.timings: Dict[str, float] = {}

    def marker(self, step: Step) -> str:
        return os.path.join(self.log_dir, f"{step.name}.done")

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def run(self, step: Step) -> str:
        """Run ``step`` unless an earlier run finished it; returns its log path."""
        log_path = self.log_path(step.name)
        if os.path.exists(self.marker(step)) and all(os.path.exists(p) for p in step.outputs):
            print(f"[demo] {step.name}: reusing the result of an earlier run ({log_path})", flush=True)
            return log_path
        print(f"[demo] {step.name}: {' '.join(shlex.quote(part) for part in step.command)}", flush=True)
        started = time.time()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                step.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=self.env, cwd=REPO, bufsize=1,
            )
            for line in process.stdout:
                log.write(line)
                if _worth_showing(line):
                    print(f"    {line.rstrip()[:160]}", flush=True)
            returncode = process.wait()
        self.timings[step.name] = time.time() - started
        if returncode != 0:
            tail = open(log_path).read().splitlines()[-25:]
            raise SystemExit(
                f"[demo] step {step.name} failed (exit {returncode}); its log is {log_path}:\n" + "\n".join(tail)
            )
        missing = [p for p in step.outputs if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"[demo] step {step.name} finished but did not write {missing}; see {log_path}")
        open(self.marker(step), "w").write(f"{self.timings[step.name]:.1f} s\n")
        print(f"[demo] {step.name}: done in {self.timings[step.name]:.0f} s", flush=True)
        return log_path


def _worth_showing(line: str) -> bool:
    """Progress worth echoing to the terminal: validation results, epochs, errors."""
    return bool(re.search(r"valid on|\| valid|epoch \d+ \||WER|Error|error:|clips in|accuracy_1", line))


CORPORA = {
    # name: avplugins-synth arguments. `speech` (2-4 s utterances) is AV-data2vec's; Synchformer
    # needs clips of >= 9 s (5 s crops with room for +-2 s offsets) of both kinds.
    "speech": ["speech", "--num-clips", "200"],
    "speech_long": ["speech", "--num-clips", "120", "--min-duration", "9", "--max-duration", "11"],
    "sparse": ["sparse", "--num-clips", "60"],
}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="output folder (reused by a second run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out_dir = os.path.abspath(args.out)
    runner = Runner(out_dir, dict(os.environ, PYTHONUNBUFFERED="1"))
    results_dir = os.path.join(out_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    report = []
    for name, synth_args in CORPORA.items():
        corpus_dir = os.path.join(out_dir, "data", name)
        runner.run(Step(
            f"corpus_{name}",
            [tool("avplugins-synth"), *synth_args, "--out", corpus_dir, "--seed", str(args.seed)],
            [os.path.join(corpus_dir, "corpus.json")],
        ))
        report.append(corpus_report(name, corpus_dir))
    text = "\n\n".join(report)
    print("\n" + text)
    with open(os.path.join(results_dir, "corpora.txt"), "w") as handle:
        handle.write(text + "\n")
    print(f"\n[demo] results in {results_dir}")


def corpus_report(name: str, corpus_dir: str) -> str:
    """The generator's own statistics table for a finished corpus."""
    from preprocess.synthetic import format_stats

    corpus = json.load(open(os.path.join(corpus_dir, "corpus.json")))
    return f"[{name}] " + format_stats(corpus["arguments"]["kind"], corpus_dir, corpus["stats"])


if __name__ == "__main__":
    main()
