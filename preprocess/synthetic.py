"""Write a deterministic synthetic audio-visual corpus, ready for ``task.data=DIR``.

    avplugins-synth speech --out DIR --num-clips 200 --seed 0     # dense cues (LRS3 stand-in)
    avplugins-synth sparse --out DIR --num-clips 200 --seed 0     # sparse cues (VGGSound-Sparse)

DIR receives ``{train,valid,test}/<id>.mp4`` (video with the audio muxed in) and ``.wav``,
the AV-HuBERT manifests ``{train,valid,test}.tsv`` (root ``.``, so DIR can be moved), and
- speech: ``{split}.wrd`` transcripts, the sentencepiece model ``spm_unigram<V>.model`` trained
  on train.wrd and fairseq's ``dict.wrd.txt``;
- sparse: ``{split}.events.tsv`` (``id <TAB> ball|flash|door <TAB> seconds``).
``corpus.json`` (arguments and statistics) is written last: running again with the same
arguments finds it and does nothing. Clip i depends only on (seed, i), never on --workers.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter
from multiprocessing import get_all_start_methods, get_context

from preprocess.synth import sparse, speech

SPLITS = ("train", "valid", "test")
CORPUS_FILE = "corpus.json"
# bump when the generator's output changes, so that old corpora are not taken for new ones
GENERATOR_VERSION = 1
OPTIONS = {"speech": speech.SpeechOptions, "sparse": sparse.SparseOptions}


def split_sizes(num_clips, valid_fraction, test_fraction):
    """(train, valid, test) clip counts: fractions rounded, but a non-zero fraction gets at least
    one clip and train keeps at least one."""
    def share(fraction):
        return max(1, round(num_clips * fraction)) if fraction > 0 else 0

    num_valid, num_test = share(valid_fraction), share(test_fraction)
    num_train = num_clips - num_valid - num_test
    if num_train < 1:
        raise ValueError(f"--num-clips {num_clips} leaves no training clip with --valid-fraction {valid_fraction} "
                         f"and --test-fraction {test_fraction}; generate more clips or lower the fractions")
    return num_train, num_valid, num_test


def clip_plan(num_clips, valid_fraction, test_fraction):
    """[(clip index, split, clip id)] for every clip: train first, then valid, then test."""
    sizes = split_sizes(num_clips, valid_fraction, test_fraction)
    splits = [split for split, size in zip(SPLITS, sizes) for _ in range(size)]
    return [(index, split, f"clip{index:06d}") for index, split in enumerate(splits)]


def _make_clip(job):
    """Worker entry point: write one clip; job = (kind, out_dir, index, split, clip_id, seed, options)."""
    kind, out_dir, index, split, clip_id, seed, options = job
    write = speech.write_speech_clip if kind == "speech" else sparse.write_sparse_clip
    try:
        return write(out_dir, split, clip_id, index, seed, options)
    except Exception as error:
        raise RuntimeError(f"{kind} clip {clip_id} (index {index}, seed {seed}) failed: {error}") from error


def generate_clips(kind, out_dir, seed, options, plan, workers):
    """Write every clip of `plan` with `workers` processes; `ClipResult`s in plan order."""
    from tqdm import tqdm

    # importing avplugins imports fairseq (seconds): forked workers inherit it instead of
    # each importing it again
    import avplugins.data.media  # noqa: F401

    jobs = [(kind, out_dir, index, split, clip_id, seed, options) for index, split, clip_id in plan]
    progress = dict(total=len(jobs), desc=f"{kind} clips", unit="clip", file=sys.stderr)
    if workers <= 1:
        return [_make_clip(job) for job in tqdm(jobs, **progress)]
    start_method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with get_context(start_method).Pool(workers) as pool:
        return list(tqdm(pool.imap(_make_clip, jobs), **progress))


def _duration_stats(results):
    durations = [r.duration_s for r in results]
    return dict(clips=len(results), hours=sum(durations) / 3600,
                mean_s=sum(durations) / len(durations) if durations else 0.0,
                min_s=min(durations, default=0.0), max_s=max(durations, default=0.0))


def corpus_stats(kind, results, num_pieces=None):
    """Per-split clip counts and durations, plus words (speech) or events (sparse) per clip."""
    stats = {"splits": {split: _duration_stats([r for r in results if r.split == split]) for split in SPLITS},
             "all": _duration_stats(results)}
    if kind == "speech":
        words = [r.label.split() for r in results]
        stats["words_per_clip"] = sum(map(len, words)) / len(words)
        stats["vocabulary_used"] = len({w for ws in words for w in ws})
        stats["vocabulary_size"] = len(speech.VOCABULARY)
        stats["sentencepiece_pieces"] = num_pieces
    else:
        counts = [len(r.events) for r in results]
        stats["events_per_clip"] = dict(mean=sum(counts) / len(counts), min=min(counts), max=max(counts))
        stats["events_by_type"] = dict(sorted(Counter(kind for r in results for kind, _ in r.events).items()))
    return stats


def format_stats(kind, out_dir, stats):
    """Human-readable summary of `corpus_stats`."""
    lines = [f"{kind} corpus in {out_dir}",
             f"{'split':<6} {'clips':>6} {'hours':>8} {'mean s':>7} {'min s':>6} {'max s':>6}"]
    for name, s in [*stats["splits"].items(), ("all", stats["all"])]:
        lines.append(f"{name:<6} {s['clips']:>6} {s['hours']:>8.4f} {s['mean_s']:>7.2f} "
                     f"{s['min_s']:>6.2f} {s['max_s']:>6.2f}")
    if kind == "speech":
        lines.append(f"words per clip {stats['words_per_clip']:.1f}; {stats['vocabulary_used']} of "
                     f"{stats['vocabulary_size']} vocabulary words used; "
                     f"sentencepiece vocabulary of {stats['sentencepiece_pieces']} pieces")
    else:
        per_clip = stats["events_per_clip"]
        by_type = ", ".join(f"{k} {n}" for k, n in stats["events_by_type"].items())
        lines.append(f"events per clip {per_clip['mean']:.2f} (min {per_clip['min']}, "
                     f"max {per_clip['max']}); {by_type}")
    return "\n".join(lines)


def write_corpus_files(kind, out_dir, results, vocab_size):
    """Manifests, and transcripts + sentencepiece vocabulary (speech) or events files (sparse).
    Returns (paths written, relative to `out_dir`; sentencepiece pieces or None)."""
    from avplugins.data.manifest import write_labels, write_manifest

    written = []
    for split in SPLITS:
        rows = [r for r in results if r.split == split]
        write_manifest(os.path.join(out_dir, f"{split}.tsv"), ".", [r.manifest_row() for r in rows])
        if kind == "speech":
            write_labels(os.path.join(out_dir, f"{split}.wrd"), [r.label for r in rows])
            written += [f"{split}.tsv", f"{split}.wrd"]
        else:
            sparse.write_events(os.path.join(out_dir, f"{split}.events.tsv"), [(r.clip_id, r.events) for r in rows])
            written += [f"{split}.tsv", f"{split}.events.tsv"]
    if kind != "speech":
        return written, None
    import sentencepiece

    from preprocess.build_vocab import build_vocab

    model_path, dict_path = build_vocab(os.path.join(out_dir, "train.wrd"), out_dir, vocab_size=vocab_size)
    written += [os.path.relpath(path, out_dir) for path in (model_path, dict_path)]
    return written, sentencepiece.SentencePieceProcessor(model_file=model_path).get_piece_size()


def corpus_arguments(args):
    """The arguments that decide a corpus's content (not --workers or --out)."""
    arguments = dict(kind=args.kind, num_clips=args.num_clips, seed=args.seed, min_duration=args.min_duration,
                     max_duration=args.max_duration, image_size=args.image_size,
                     valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                     generator_version=GENERATOR_VERSION)
    if args.kind == "speech":
        arguments["vocab_size"] = args.vocab_size
    return arguments


def existing_corpus(out_dir, arguments):
    """The stored `corpus.json` content when `out_dir` holds a complete corpus made with
    `arguments`, None when there is none; raises when it was made with other arguments."""
    path = os.path.join(out_dir, CORPUS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.get("arguments") != arguments:
        differences = {k: (stored.get("arguments", {}).get(k), v) for k, v in arguments.items()
                       if stored.get("arguments", {}).get(k) != v}
        raise ValueError(f"{out_dir} already holds a different corpus ({path}: stored vs requested {differences}); "
                         f"choose another --out, or delete {out_dir} to regenerate it")
    missing = [p for p in stored.get("files", []) if not os.path.isfile(os.path.join(out_dir, p))]
    if missing:
        print(f"{path} lists {len(missing)} missing files (e.g. {missing[0]}): generating the corpus again")
        return None
    return stored


def make_corpus(args):
    """Write the corpus `args` describes (or find it already there); returns its statistics."""
    arguments = corpus_arguments(args)
    stored = existing_corpus(args.out, arguments)
    if stored is not None:
        print(f"{args.out} already holds this corpus ({CORPUS_FILE} matches the arguments): nothing to do")
        print(format_stats(args.kind, args.out, stored["stats"]))
        return stored["stats"]
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    plan = clip_plan(args.num_clips, args.valid_fraction, args.test_fraction)
    workers = max(1, min(args.workers, len(plan)))
    options = OPTIONS[args.kind](args.min_duration, args.max_duration, args.image_size)
    results = generate_clips(args.kind, args.out, args.seed, options, plan, workers)
    corpus_files, num_pieces = write_corpus_files(args.kind, args.out, results, args.vocab_size)
    stats = corpus_stats(args.kind, results, num_pieces)
    media_files = [path for r in results for path in (r.video_path, r.audio_path)]
    record = dict(arguments=arguments, stats=stats, files=media_files + corpus_files)
    temporary = os.path.join(args.out, CORPUS_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(temporary, os.path.join(args.out, CORPUS_FILE))
    print(format_stats(args.kind, args.out, stats))
    print(f"generated {len(results)} clips in {time.monotonic() - started:.1f} s with {workers} worker(s)")
    return stats


def _default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _per_kind_default(field):
    """"(speech X, sparse Y)": the option's default for each kind, for --help."""
    return "(" + ", ".join(f"{kind} {getattr(options, field):g}" for kind, options in OPTIONS.items()) + ")"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="avplugins-synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speech", "sparse"), help="dense speech cues or sparse event cues")
    parser.add_argument("--out", required=True, help="corpus folder (created)")
    parser.add_argument("--num-clips", type=int, required=True, help="clips over all splits")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--min-duration", type=float,
                        help=f"shortest clip in seconds {_per_kind_default('min_duration_s')}")
    parser.add_argument("--max-duration", type=float,
                        help=f"longest clip in seconds {_per_kind_default('max_duration_s')}")
    parser.add_argument("--image-size", type=int,
                        help=f"frame height and width in pixels {_per_kind_default('image_size')}")
    parser.add_argument("--workers", type=int, default=_default_workers(), help="processes (default: CPU count)")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of clips in valid (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of clips in test (default 0.1)")
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="sentencepiece pieces (speech; default 1000, fewer on a small corpus)")
    args = parser.parse_args(argv)
    defaults = OPTIONS[args.kind]()
    args.min_duration = defaults.min_duration_s if args.min_duration is None else args.min_duration
    args.max_duration = defaults.max_duration_s if args.max_duration is None else args.max_duration
    args.image_size = defaults.image_size if args.image_size is None else args.image_size
    problems = []
    if args.num_clips < 1:
        problems.append(f"--num-clips must be >= 1, got {args.num_clips}")
    if not 0 < args.min_duration <= args.max_duration:
        problems.append(f"need 0 < --min-duration <= --max-duration, got {args.min_duration} and {args.max_duration}")
    if args.kind == "sparse" and args.min_duration < sparse.MIN_CLIP_S:
        problems.append(f"sparse clips need --min-duration >= {sparse.MIN_CLIP_S:.2f} s to hold an event")
    if args.image_size < 16 or args.image_size % 2:
        problems.append(f"--image-size must be even and >= 16 (H.264 needs even sizes), got {args.image_size}")
    for name in ("valid_fraction", "test_fraction"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.vocab_size < 1:
        problems.append(f"--vocab-size must be >= 1, got {args.vocab_size}")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv=None):
    """Console script `avplugins-synth`."""
    args = parse_args(argv)
    try:
        make_corpus(args)
    except ValueError as error:
        raise SystemExit(f"avplugins-synth: error: {error}") from error


if __name__ == "__main__":
    main()
