"""T5 prompt tokenization (fixed 300-token captions) and a tiny-tokenizer builder.

`T5PromptTokenizer.tokenize` reproduces PixArt's call
`tokenizer(prompts, padding="max_length", max_length=300, truncation=True)`: ids end with EOS (id 1),
pads are id 0, the empty prompt "" is [EOS] + pads (mask length 1). A prompt that does not fit is
truncated (EOS kept) and logged as a WARNING naming the prompt and the number of dropped tokens.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from pixart_jax.convert.hub import resolve_local

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _tokenizer_dir(src: str | os.PathLike) -> str:
  """A local tokenizer dir from: a tokenizer dir, a pipeline dir (its `tokenizer/`), or a Hub id."""
  path = os.fspath(resolve_local(src, allow_patterns=["tokenizer/*", *TOKENIZER_FILES,
                                                       "special_tokens_map.json"]))
  sub = os.path.join(path, "tokenizer")
  if os.path.isdir(sub):
    path = sub
  if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"no tokenizer in {src!r}: expected one of {TOKENIZER_FILES} in "
                            f"{path!r} (or a 'tokenizer/' subfolder)")
  return path


class T5PromptTokenizer:
  """Wraps a transformers T5 tokenizer; returns fixed-length int32 numpy ids and masks."""

  def __init__(self, hf_tokenizer):
    if hf_tokenizer.pad_token_id is None or hf_tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer {type(hf_tokenizer).__name__} needs a pad and an eos token "
                       f"(got pad={hf_tokenizer.pad_token_id}, eos={hf_tokenizer.eos_token_id})")
    self.hf = hf_tokenizer

  @classmethod
  def from_pretrained(cls, src: str | os.PathLike) -> "T5PromptTokenizer":
    """src: a tokenizer dir, a pipeline dir with `tokenizer/`, or a Hub id."""
    from transformers import AutoTokenizer  # tokenizer classes only, no torch needed
    return cls(AutoTokenizer.from_pretrained(_tokenizer_dir(src)))

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can emit (SentencePiece pieces + extra ids)."""
    return len(self.hf)

  @property
  def pad_id(self) -> int:
    return int(self.hf.pad_token_id)

  @property
  def eos_id(self) -> int:
    return int(self.hf.eos_token_id)

  def tokenize(self, prompts: Sequence[str], max_length: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """prompts: B strings -> (ids (B, max_length) int32, mask (B, max_length) int32, 1 = token)."""
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
      raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
      if not isinstance(p, str):
        raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    full = self.hf(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, ids in enumerate(full):
      if len(ids) > max_length:
        short = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + "..."
        logger.warning("prompt %d (%r) has %d tokens; truncated to max_length=%d, dropped %d tokens",
                       i, short, len(ids), max_length, len(ids) - max_length)
    enc = self.hf(prompts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

  __call__ = tokenize


def load_tokenizer(src: str | os.PathLike) -> T5PromptTokenizer:
  """The T5 tokenizer of a model dir (`tokenizer/`), a tokenizer dir, or a Hub id."""
  return T5PromptTokenizer.from_pretrained(src)


def build_t5_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, *,
                       extra_ids: int = 0) -> T5PromptTokenizer:
  """Trains a SentencePiece unigram model on `texts`; saves a real T5 tokenizer dir; returns it.

  The directory holds `spiece.model` (the T5 format: <pad>=0, </s>=1, <unk>=2, no BOS) plus the
  transformers files written by `T5Tokenizer.save_pretrained` (`tokenizer.json`,
  `tokenizer_config.json`), so it loads with `AutoTokenizer`/`T5Tokenizer` like a released one.
  `vocab_size` is an upper bound on SentencePiece pieces (a tiny corpus may give fewer); the
  tokenizer's `vocab_size` adds the `extra_ids` sentinels (real T5: 32000 + 100).
  """
  import sentencepiece as spm
  from transformers import T5Tokenizer

  texts = [t for t in texts if isinstance(t, str) and t.strip()]
  if not texts:
    raise ValueError("build_t5_tokenizer needs at least one non-empty text")
  if vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
    f.write(model.getvalue())
  # transformers 5's T5Tokenizer converts `spiece.model` when loaded from a directory (its
  # constructor ignores a `vocab_file` argument); then save_pretrained writes tokenizer.json.
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids}, f)
  hf = T5Tokenizer.from_pretrained(out_dir, extra_ids=extra_ids)
  hf.save_pretrained(out_dir)
  tok = T5PromptTokenizer(hf)
  if (tok.pad_id, tok.eos_id, hf.unk_token_id) != (0, 1, 2):
    raise RuntimeError(f"built tokenizer has pad/eos/unk ids {(tok.pad_id, tok.eos_id, hf.unk_token_id)}"
                       ", expected (0, 1, 2)")
  return tok
