"""Train a sentencepiece vocabulary on ``train.wrd`` and write fairseq's ``dict.wrd.txt``.

Writes ``spm_{model_type}{vocab_size}.model`` / ``.vocab`` (the name keeps the requested
size even when a small corpus yields fewer pieces) and ``dict.wrd.txt``: one
``piece count`` line per piece, with the number of times the piece occurs in the encoded
training transcripts, most frequent first. The specials fairseq's ``Dictionary`` adds
itself (<s>, <pad>, </s>, <unk>) are left out.

    python -m preprocess.build_vocab --wrd DATA/train.wrd --out DATA [--vocab-size 1000]
"""
import argparse
import collections
import logging
import os
from typing import List, Optional, Tuple

import sentencepiece as spm

logger = logging.getLogger(__name__)

DICT_NAME = "dict.wrd.txt"
MODEL_TYPES = ("unigram", "bpe", "char", "word")


def spm_model_prefix(out_dir: str, vocab_size: int, model_type: str) -> str:
    """``out_dir/spm_{model_type}{vocab_size}`` (AV-HuBERT's naming, e.g. spm_unigram1000)."""
    return os.path.join(out_dir, f"spm_{model_type}{vocab_size}")


def _train_sentencepiece(wrd_path: str, prefix: str, vocab_size: int, model_type: str) -> None:
    """Train with an exact vocabulary size; if the corpus is too small for it, train again
    with sentencepiece's soft limit (fewer pieces) and warn."""
    options = dict(input=wrd_path, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                   character_coverage=1.0, minloglevel=2)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        if "Vocabulary size too high" not in str(e):
            raise ValueError(f"{wrd_path}: sentencepiece cannot train {vocab_size} {model_type} pieces "
                             f"({e}). Choose another --vocab-size") from e
        spm.SentencePieceTrainer.train(hard_vocab_limit=False, **options)


def _piece_counts(processor: spm.SentencePieceProcessor, transcripts: List[str]) -> collections.Counter:
    """How often each piece id occurs in the encoded ``transcripts``."""
    counts = collections.Counter()
    for ids in processor.encode(transcripts):
        counts.update(ids)
    return counts


def _is_special(processor: spm.SentencePieceProcessor, piece_id: int) -> bool:
    return (processor.is_control(piece_id) or processor.is_unknown(piece_id)
            or processor.id_to_piece(piece_id) == "<pad>")


def dictionary_lines(processor: spm.SentencePieceProcessor, transcripts: List[str]) -> List[str]:
    """``piece count`` lines for every non-special piece (unseen pieces get 0), sorted by
    count (descending), ties by piece id, so every encodable piece is in the dictionary."""
    counts = _piece_counts(processor, transcripts)
    piece_ids = [i for i in range(processor.get_piece_size()) if not _is_special(processor, i)]
    piece_ids.sort(key=lambda i: (-counts[i], i))
    return [f"{processor.id_to_piece(i)} {counts[i]}" for i in piece_ids]


def _read_transcripts(wrd_path: str) -> List[str]:
    with open(wrd_path, encoding="utf-8") as f:
        transcripts = [line.rstrip("\n\r") for line in f]
    if not any(t.strip() for t in transcripts):
        raise ValueError(f"{wrd_path}: no transcripts to train a vocabulary on. Give a non-empty .wrd file")
    return transcripts


def build_vocab(wrd_path: str, out_dir: str, vocab_size: int = 1000, model_type: str = "unigram") -> Tuple[str, str]:
    """Train the sentencepiece model and write ``dict.wrd.txt`` into ``out_dir``.

    Returns (path of ``spm_{model_type}{vocab_size}.model``, path of ``dict.wrd.txt``).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    transcripts = _read_transcripts(wrd_path)
    os.makedirs(out_dir, exist_ok=True)
    prefix = spm_model_prefix(out_dir, vocab_size, model_type)
    _train_sentencepiece(wrd_path, prefix, vocab_size, model_type)
    processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
    if processor.get_piece_size() < vocab_size:
        logger.warning("%s is too small for %d pieces: trained a vocabulary of %d pieces instead",
                       wrd_path, vocab_size, processor.get_piece_size())
    dict_path = os.path.join(out_dir, DICT_NAME)
    with open(dict_path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in dictionary_lines(processor, transcripts))
    return prefix + ".model", dict_path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrd", required=True, help="training transcripts, one per line (train.wrd)")
    parser.add_argument("--out", required=True, help="folder for the sentencepiece model and dict.wrd.txt")
    parser.add_argument("--vocab-size", type=int, default=1000, help="number of pieces (default 1000)")
    parser.add_argument("--model-type", default="unigram", choices=MODEL_TYPES, help="sentencepiece model type")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        model_path, dict_path = build_vocab(args.wrd, args.out, args.vocab_size, args.model_type)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    num_pieces = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    print(f"wrote {model_path} ({num_pieces} pieces) and {dict_path}")


if __name__ == "__main__":
    main()
