"""JSONL loading, tokenizers and grain input pipelines for masked-diffusion SFT.

Dimension legend:
  N: number of records (rows) in an encoded dataset
  B: per-process batch size
  P: prompt length (left-padded)
  A: answer / completion length (answer tokens, then EOS fill)
  T: total row length, P + A
"""

import io
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np
import sentencepiece as spm
import tokenizers
from absl import logging

from trafl_jax import jsonl

MASK_TOKEN = "<|mdm_mask|>"
# Fixed ids of the sentencepiece models trained here; the mask is the first user-defined symbol,
# so it lands right after the four reserved ids.
SPM_PAD_ID, SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID, SPM_MASK_ID = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# JSONL.


def load_jsonl(path: str, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
  """Reads `{"prompt": str, "answer": str}` records; errors name the file and 1-based line."""
  records = []
  for where, obj in jsonl.read(path):
    for key in (prompt_key, answer_key):
      if key not in obj:
        raise ValueError(f"{where}: missing key {key!r} (has keys {sorted(obj)})")
      if not isinstance(obj[key], str):
        raise ValueError(
          f"{where}: value of key {key!r} must be a string, got {type(obj[key]).__name__}"
        )
    records.append({"prompt": obj[prompt_key], "answer": obj[answer_key]})
  if not records:
    raise ValueError(f"{path}: no records (file is empty or has only blank lines)")
  return records


# ----------------------------------------------------------------------------------------------
# Tokenizers.


class Tokenizer(Protocol):
  """What the rest of the code needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  eos_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
  """SentencePiece model with a `<|mdm_mask|>` user-defined symbol as mask token."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise ValueError(f"SentencePiece model file not found: {model_path}")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
      raise ValueError(
        f"Cannot load SentencePiece model {model_path} (corrupt or not a model file): {e}"
      ) from None
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.eos_id = int(self._sp.eos_id())
    # piece_to_id returns unk for unknown pieces, so verify the round trip.
    self.mask_id = int(self._sp.piece_to_id(MASK_TOKEN))
    if self._sp.id_to_piece(self.mask_id) != MASK_TOKEN:
      raise ValueError(f"SentencePiece model {model_path} has no {MASK_TOKEN!r} piece")
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(
        f"SentencePiece model {model_path} needs pad and eos pieces "
        f"(pad_id={self.pad_id}, eos_id={self.eos_id})"
      )
    self._skip_ids = frozenset({self.pad_id, self.eos_id, self.mask_id})

  def encode(self, text: str) -> list[int]:
    return [int(i) for i in self._sp.encode(text, out_type=int)]

  def token_id(self, piece: str) -> int | None:
    """The id of a piece, or None when the vocabulary lacks it."""
    i = int(self._sp.piece_to_id(piece))
    return i if self._sp.id_to_piece(i) == piece else None

  def decode(self, ids: Sequence[int]) -> str:
    # Models may emit ids past the tokenizer's vocabulary (the model vocab is padded); drop them.
    kept = [int(i) for i in ids if int(i) not in self._skip_ids and 0 <= int(i) < self.vocab_size]
    return self._sp.decode(kept)


def train_sentencepiece(texts: list[str], model_prefix: str, vocab_size: int) -> None:
  """Trains a BPE model on in-memory `texts` and writes `<model_prefix>.model` atomically.

  Ids: pad 0, unk 1, bos 2, eos 3, `<|mdm_mask|>` 4, "\\n" 5. Digits are split so numbers are
  tokenized digit by digit. Normalisation and whitespace handling are off so that
  `decode(encode(s)) == s` for text made of characters seen in training (the trainer otherwise
  drops newlines, which end every prompt).
  """
  if not texts:
    raise ValueError("train_sentencepiece needs at least one text")
  model_path = f"{model_prefix}.model"
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=writer,
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      byte_fallback=False,
      character_coverage=1.0,
      split_digits=True,
      pad_id=SPM_PAD_ID,
      unk_id=SPM_UNK_ID,
      bos_id=SPM_BOS_ID,
      eos_id=SPM_EOS_ID,
      # The trainer strips line ends from sentences, so "\n" is only learned as a symbol.
      user_defined_symbols=[MASK_TOKEN, "\n"],
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training for {model_path} failed: {e}") from None
  # Write-then-rename so a killed run never leaves a truncated model that later runs would reuse.
  # mkstemp (not pid) naming: hosts sharing a filesystem may train concurrently.
  fd, tmp_path = tempfile.mkstemp(
    dir=os.path.dirname(os.path.abspath(model_path)), prefix=".spm.model.tmp."
  )
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(writer.getvalue())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, model_path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json; special ids come from the config since they vary by model."""

  def __init__(self, path_to_tokenizer_json: str, mask_id: int, eos_id: int, pad_id: int):
    if not os.path.isfile(path_to_tokenizer_json):
      raise ValueError(f"tokenizer.json not found: {path_to_tokenizer_json}")
    self.path = path_to_tokenizer_json
    try:
      self._tok = tokenizers.Tokenizer.from_file(path_to_tokenizer_json)
    except Exception as e:  # The Rust side raises plain Exception subclasses.
      raise ValueError(f"Cannot load tokenizer {path_to_tokenizer_json}: {e}") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.mask_id, self.eos_id, self.pad_id = int(mask_id), int(eos_id), int(pad_id)
    self._skip_ids = frozenset({self.pad_id, self.eos_id, self.mask_id})

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def token_id(self, piece: str) -> int | None:
    """The id of a token (added/special tokens included), or None when the vocabulary lacks it."""
    return self._tok.token_to_id(piece)

  def decode(self, ids: Sequence[int]) -> str:
    kept = [int(i) for i in ids if int(i) not in self._skip_ids and 0 <= int(i) < self.vocab_size]
    return self._tok.decode(kept, skip_special_tokens=False)


def _check_special_ids(tok: Tokenizer, vocab_size: int, where: str) -> None:
  if tok.vocab_size > vocab_size:
    raise ValueError(
      f"Tokenizer {where} has {tok.vocab_size} tokens, more than the model vocab_size {vocab_size}"
    )
  for name in ("mask_id", "eos_id", "pad_id"):
    value = getattr(tok, name)
    if not 0 <= value < vocab_size:
      raise ValueError(f"Tokenizer {where}: {name}={value} is outside [0, {vocab_size})")
  if tok.mask_id in (tok.eos_id, tok.pad_id):
    raise ValueError(f"Tokenizer {where}: mask_id={tok.mask_id} must differ from eos and pad ids")


def get_tokenizer(
  kind: str,
  path: str | None,
  workdir: str,
  texts: list[str] | None,
  vocab_size: int,
  *,
  mask_id: int | None = None,
  eos_id: int | None = None,
  pad_id: int | None = None,
) -> Tokenizer:
  """Builds the tokenizer named by the config.

  kind "sentencepiece": loads `path`, or else `<workdir>/tokenizer/spm.model`, training it on
    `texts` the first time (later calls reuse the cached file whatever `texts` is). Given
    `mask_id` / `eos_id` / `pad_id` must match the model's ids.
  kind "hf": `path` is a tokenizer.json or a directory holding one; the three ids are required.
  `vocab_size` is the model's vocabulary size, which must hold every tokenizer id.
  """
  if kind == "sentencepiece":
    if path is None:
      model_path = os.path.join(workdir, "tokenizer", "spm.model")
      if os.path.isfile(model_path):
        logging.info("Reusing cached SentencePiece model %s", model_path)
      else:
        if not texts:
          raise ValueError(f"No SentencePiece model at {model_path} and no texts to train one on")
        logging.info(
          "Training SentencePiece model %s on %d texts (vocab_size<=%d)",
          model_path,
          len(texts),
          vocab_size,
        )
        train_sentencepiece(texts, model_path[: -len(".model")], vocab_size)
    else:
      model_path = path
    tok = SentencePieceTokenizer(model_path)
    expected = {"mask_id": mask_id, "eos_id": eos_id, "pad_id": pad_id}
    wrong = {k: v for k, v in expected.items() if v is not None and v != getattr(tok, k)}
    if wrong:
      actual = {k: getattr(tok, k) for k in wrong}
      raise ValueError(
        f"Config special ids {wrong} disagree with SentencePiece model {model_path} ids {actual}"
      )
  elif kind == "hf":
    if path is None:
      raise ValueError("tokenizer kind 'hf' needs a path to tokenizer.json or its directory")
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if mask_id is None or eos_id is None or pad_id is None:
      raise ValueError(
        f"tokenizer kind 'hf' ({json_path}) needs mask_id, eos_id and pad_id, got "
        f"mask_id={mask_id}, eos_id={eos_id}, pad_id={pad_id}"
      )
    model_path = json_path
    tok = HuggingFaceTokenizer(json_path, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
  else:
    raise ValueError(f"Unknown tokenizer kind {kind!r} (path={path}); use 'sentencepiece' or 'hf'")
  _check_special_ids(tok, vocab_size, model_path)
  return tok


# ----------------------------------------------------------------------------------------------
# SFT encoding.


TOO_LONG = ("error", "drop")


def encode_sft(
  records: Sequence[dict], tok: Tokenizer, prompt_len: int, answer_len: int, too_long: str = "error"
) -> dict[str, np.ndarray]:
  """Encodes prompt/answer pairs in the LLaDA SFT layout.

  Row = [pad]*k + prompt (P tokens in all) | answer + [eos]* (A tokens, at least one eos).
  A record longer than that is an error naming it (`too_long="error"`) or is left out, with the count
  logged (`"drop"`; at least one record must fit).

  Returns:
    tokens_NxT int32, valid_NxT bool (False only on left padding), completion_NxT bool (True on
    the A completion positions, EOS fill included), under keys "tokens", "valid", "completion".
  """
  if prompt_len < 0 or answer_len < 1:
    raise ValueError(f"Need prompt_len >= 0 and answer_len >= 1, got {prompt_len}, {answer_len}")
  if too_long not in TOO_LONG:
    raise ValueError(f"too_long {too_long!r} is not one of {TOO_LONG}")
  encoded, dropped = [], 0
  for i, record in enumerate(records):
    prompt_ids = tok.encode(record["prompt"])
    answer_ids = tok.encode(record["answer"])
    problem = None
    if len(prompt_ids) > prompt_len:
      problem = f"prompt has {len(prompt_ids)} tokens, more than prompt_len={prompt_len}"
    elif len(answer_ids) + 1 > answer_len:
      problem = f"answer has {len(answer_ids)} tokens; answer_len={answer_len} needs room for them"
      problem += " plus one EOS"
    if problem is None:
      encoded.append((prompt_ids, answer_ids))
    elif too_long == "error":
      raise ValueError(f"Record {i}: {problem} (data.too_long='drop' leaves such records out)")
    else:
      dropped += 1
  if dropped:
    logging.warning(
      "left out %d of %d records longer than prompt_len=%d + answer_len=%d",
      dropped,
      len(records),
      prompt_len,
      answer_len,
    )
  if not encoded:
    raise ValueError(f"no record fits prompt_len={prompt_len} + answer_len={answer_len}")
  num_rows, seq_len = len(encoded), prompt_len + answer_len
  tokens_NxT = np.full((num_rows, seq_len), tok.pad_id, dtype=np.int32)
  valid_NxT = np.ones((num_rows, seq_len), dtype=bool)
  completion_NxT = np.zeros((num_rows, seq_len), dtype=bool)
  completion_NxT[:, prompt_len:] = True
  for i, (prompt_ids, answer_ids) in enumerate(encoded):
    start = prompt_len - len(prompt_ids)
    valid_NxT[i, :start] = False
    tokens_NxT[i, start:prompt_len] = prompt_ids
    tokens_NxT[i, prompt_len : prompt_len + len(answer_ids)] = answer_ids
    tokens_NxT[i, prompt_len + len(answer_ids) :] = tok.eos_id
  return {"tokens": tokens_NxT, "valid": valid_NxT, "completion": completion_NxT}


def extend_canvas(arrays: dict[str, np.ndarray], extra: int, eos_id: int) -> dict[str, np.ndarray]:
  """`encode_sft`'s rows with `extra` more completion positions of EOS fill: the rows it would have
  encoded at an answer length `extra` longer (every answer already ends in EOS fill)."""
  if extra < 0:
    raise ValueError(f"extend_canvas needs extra >= 0, got {extra}")
  num_rows = len(arrays["tokens"])
  fill = {"tokens": eos_id, "valid": True, "completion": True}
  return {
    k: np.concatenate([v, np.full((num_rows, extra), fill[k], dtype=v.dtype)], axis=1)
    for k, v in arrays.items()
  }


def crop_canvas(batch: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """The batch with its rows cut to their first `seq_len` positions (prompt, then a shorter EOS-filled
  completion canvas)."""
  return {k: v[:, :seq_len] for k, v in batch.items()}


def canvas_length(lengths: Sequence[int], seed: int, step: int) -> int:
  """The completion canvas of training step `step`: one of `lengths`, uniformly, as a pure function of
  (seed, step), so every process draws the same and a resumed run draws what it would have."""
  rng = np.random.default_rng([seed, step, 0x43414E])
  return int(lengths[rng.integers(len(lengths))])


# ----------------------------------------------------------------------------------------------
# Grain pipeline.


def make_train_iterator(
  arrays: dict[str, np.ndarray],
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
) -> grain.DatasetIterator:
  """Infinite iterator of per-process batches `{key: array[B, ...]}` over rows of `arrays`.

  Process i reads rows i::process_count. Each epoch over the shard is reshuffled with a new
  permutation and batched separately with drop_remainder (no batch straddles two epochs). The
  iterator's state is `{"next_index": batches_consumed}` (plain JSON); see
  `iterator_state_to_json` / `restore_iterator_state`.
  """
  if not arrays:
    raise ValueError("make_train_iterator needs at least one array")
  lengths = {k: len(v) for k, v in arrays.items()}
  num_rows = next(iter(lengths.values()))
  if any(n != num_rows for n in lengths.values()):
    raise ValueError(f"All arrays need the same number of rows, got {lengths}")
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"Need 0 <= process_index < process_count, got {process_index}, {process_count}"
    )
  rows_per_process = len(range(process_index, num_rows, process_count))
  if not 1 <= batch_size <= rows_per_process:
    raise ValueError(
      f"batch_size={batch_size} must be in [1, rows in this process's shard = {rows_per_process}] "
      f"({num_rows} rows over {process_count} processes)"
    )
  arrays = {k: np.asarray(v) for k, v in arrays.items()}

  def gather(row_ids: Sequence[int]) -> dict[str, np.ndarray]:
    # Indexing the arrays once per batch is much cheaper than grain's per-row stacking.
    idx_B = np.asarray(row_ids, dtype=np.int64)
    return {k: v[idx_B] for k, v in arrays.items()}

  # The pipeline carries row indices, so it is cheap to shard, shuffle and checkpoint.
  ds = grain.MapDataset.range(num_rows)[process_index::process_count]
  if shuffle:
    # grain reshuffles epoch e with seed + e, so neighbouring user seeds would share permutations
    # shifted by one epoch; hashing the seed first decorrelates them.
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    ds = ds.shuffle(seed=grain_seed)
  # batch before repeat: each epoch is batched on its own; repeat() then reseeds the shuffle per
  # epoch because it forwards indices past the end, which shuffle maps to epoch-specific seeds.
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=gather).repeat(None)
  # In-memory data: threads only add GIL contention and nondeterministic prefetch state.
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return ds.to_iter_dataset(read_options).__iter__()


def iterator_state_to_json(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator state as plain JSON types (`{"next_index": int}` for our pipeline)."""
  return json.loads(json.dumps(it.get_state(), default=_json_default))


def restore_iterator_state(it: grain.DatasetIterator, state_dict: dict[str, Any]) -> None:
  """Inverse of `iterator_state_to_json`: the next batch is the one after the saved batch."""
  if not isinstance(state_dict, dict) or "next_index" not in state_dict:
    raise ValueError(f"Not a train iterator state (expected {{'next_index': int}}): {state_dict}")
  it.set_state(state_dict)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"Iterator state value {value!r} is not JSON-serializable")
