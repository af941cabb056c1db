"""Tests for trafl_jax.data and trafl_jax.tasks.countdown.

Dimension legend: N rows, B batch, T = prompt_len + answer_len.
"""

import collections
import fractions
import gzip
import json
import logging
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from trafl_jax import data, jsonl
from trafl_jax.tasks import countdown

# ----------------------------------------------------------------------------------------------
# Countdown.


def test_countdown_deterministic_per_seed_and_correct():
  a = countdown.generate(200, seed=7)
  b = countdown.generate(200, seed=7)
  c = countdown.generate(200, seed=8)
  assert a == b
  assert a != c
  assert len(a) == 200
  for p in a:
    assert len(p["numbers"]) == 3
    assert all(1 <= n <= 20 for n in p["numbers"])
    assert isinstance(p["target"], int) and p["target"] > 0
    assert p["prompt"] == (f"Numbers: {' '.join(map(str, p['numbers']))}. Target: {p['target']}.\n")
    assert " " not in p["answer"]
    assert countdown.is_correct(p["answer"], p["numbers"], p["target"])
    assert countdown.evaluate_expression(p["answer"]) == p["target"]


def test_countdown_answers_are_varied_and_options_respected():
  problems = countdown.generate(300, seed=0, num_numbers=4, max_number=9)
  assert all(len(p["numbers"]) == 4 and max(p["numbers"]) <= 9 for p in problems)
  assert all(countdown.is_correct(p["answer"], p["numbers"], p["target"]) for p in problems)
  ops_used = collections.Counter(ch for p in problems for ch in p["answer"] if ch in "+-*/")
  assert set(ops_used) == {"+", "-", "*", "/"}


def test_countdown_solutions_contain_answer_and_are_all_correct():
  for p in countdown.generate(50, seed=3):
    sols = countdown.solutions(p["numbers"], p["target"])
    assert p["answer"] in sols
    assert len(sols) == len(set(sols))
    for s in sols:
      assert countdown.is_correct(s, p["numbers"], p["target"])


def test_countdown_solutions_hand_example():
  sols = countdown.solutions([3, 7, 12], 33)
  assert "3*7+12" in sols and "12+7*3" in sols and "7*3+12" in sols
  assert "3+7*12" not in sols  # 87: precedence matters.
  # Repeated numbers must not produce duplicate strings.
  assert countdown.solutions([2, 2, 2], 6) == ["2+2+2", "2+2*2", "2*2+2"]


@pytest.mark.parametrize(
  "expr, expected",
  [
    ("3*7+12", 33),
    ("2+3*4", 14),
    ("12-2*3", 6),
    ("8/2/2", 2),
    ("1-2-3", -4),
    ("7/2", fractions.Fraction(7, 2)),
    ("(2+3)*4", 20),
    (" 2 + 3 ", 5),
    ("1/0", None),
    ("5/(3-3)", None),
    ("3+", None),
    ("+3", None),
    ("3 4", None),
    ("2*(3", None),
    ("2**3", None),
    ("3a", None),
    ("", None),
    ("import os", None),
  ],
)
def test_evaluate_expression(expr, expected):
  assert countdown.evaluate_expression(expr) == expected


def test_is_correct_requires_exact_multiset_and_target():
  assert countdown.is_correct("3*7+12", [12, 3, 7], 33)
  assert not countdown.is_correct("3*7+12", [12, 3, 7], 34)
  assert not countdown.is_correct("3*7", [12, 3, 7], 21)  # Unused number.
  assert not countdown.is_correct("3*7+12+3", [12, 3, 7], 36)  # Reused number.
  assert not countdown.is_correct("3*7+12+", [12, 3, 7], 33)
  assert countdown.is_correct("2+2", [2, 2], 4)
  assert not countdown.is_correct("2+2", [2], 4)


# ----------------------------------------------------------------------------------------------
# JSONL.


def _write(tmp_path, text, name="d.jsonl"):
  path = tmp_path / name
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text, encoding="utf-8")
  return str(path)


def test_load_jsonl_ok_skips_blank_lines_and_maps_keys(tmp_path):
  path = _write(tmp_path, '{"q": "a", "r": "b", "x": 1}\n\n   \n{"q": "c", "r": "d"}\n')
  assert data.load_jsonl(path, prompt_key="q", answer_key="r") == [
    {"prompt": "a", "answer": "b"},
    {"prompt": "c", "answer": "d"},
  ]


@pytest.mark.parametrize(
  "text, fragments",
  [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", \n', ["line 2", "invalid JSON"]),
    ('{"prompt": "a", "answer": "b"}\n\n[1, 2]\n', ["line 3", "JSON object"]),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n', ["line 2", "'answer'"]),
    ('{"prompt": 5, "answer": "b"}\n', ["line 1", "'prompt'", "string"]),
    ("", ["no records"]),
    ("\n  \n", ["no records"]),
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff"}\n', ["line 2", "UTF-8"]),
  ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, text, fragments):
  path = _write(tmp_path, text)
  with pytest.raises(ValueError) as info:
    data.load_jsonl(path)
  message = str(info.value)
  assert path in message
  for fragment in fragments:
    assert fragment in message


def test_load_jsonl_missing_file(tmp_path):
  path = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    data.load_jsonl(path)


def test_jsonl_reader_reads_gzip_and_names_where_each_record_is(tmp_path):
  path = tmp_path / "d.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write('{"a": 1}\n\n{"a": 2}\n')
  assert jsonl.read(str(path)) == [(f"{path}, line 1", {"a": 1}), (f"{path}, line 3", {"a": 2})]
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write('{"a": 1}\n{"a": \n')
  with pytest.raises(ValueError, match=r"d.jsonl.gz, line 2: invalid JSON"):
    jsonl.read(str(path))


def test_jsonl_reader_skips_corrupt_lines_only_when_asked(tmp_path, caplog):
  # What a kill mid-append leaves, and what the next run appends after it.
  text = b'{"a": 1}\n{"a": 2, "b\n{"a": 3}{"a": 4}\n[5]\n\xff\n{"a": 6}\n{"a": 7, "'
  path = _write(tmp_path, text)
  with pytest.raises(ValueError, match="line 2: invalid JSON"):
    jsonl.read(path)
  with caplog.at_level(logging.WARNING):
    records = jsonl.read(path, skip_corrupt=True)
  assert records == [(f"{path}, line 1", {"a": 1}), (f"{path}, line 6", {"a": 6})]
  for line in (2, 3, 4, 5, 7):
    assert f"{path}, line {line}: skipping a corrupt line" in caplog.text
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    jsonl.read(str(tmp_path / "nope.jsonl"), skip_corrupt=True)


# ----------------------------------------------------------------------------------------------
# Tokenizers.


def _countdown_texts(n=300):
  problems = countdown.generate(n, seed=0)
  return [p["prompt"] + p["answer"] for p in problems]


def test_sentencepiece_ids_roundtrip_and_cache(tmp_path, monkeypatch):
  workdir = str(tmp_path / "work")
  tok = data.get_tokenizer("sentencepiece", None, workdir, _countdown_texts(), vocab_size=128)
  assert (tok.pad_id, tok.eos_id, tok.mask_id) == (0, 3, 4)
  assert tok.vocab_size <= 128
  prompt = "Numbers: 12 19 7. Target: 14.\n"
  ids = tok.encode(prompt)
  assert tok.decode(ids) == prompt
  assert tok.decode(ids + [tok.eos_id, tok.mask_id, tok.pad_id]) == prompt
  # Digits are split, so every multi-digit number is several tokens.
  assert len(tok.encode("1234")) == 4
  assert tok.encode("<|mdm_mask|>") == [4]

  model_path = os.path.join(workdir, "tokenizer", "spm.model")
  mtime = os.stat(model_path).st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError("retrained a cached tokenizer")

  monkeypatch.setattr(data, "train_sentencepiece", fail)
  tok2 = data.get_tokenizer(
    "sentencepiece", None, workdir, None, vocab_size=128, mask_id=4, eos_id=3, pad_id=0
  )
  assert os.stat(model_path).st_mtime_ns == mtime
  assert tok2.encode(prompt) == ids
  assert not [f for f in os.listdir(os.path.dirname(model_path)) if ".tmp" in f]


def test_sentencepiece_explicit_path_and_config_checks(tmp_path):
  prefix = str(tmp_path / "m")
  data.train_sentencepiece(_countdown_texts(), prefix, vocab_size=100)
  tok = data.get_tokenizer("sentencepiece", prefix + ".model", str(tmp_path), None, 100)
  assert tok.mask_id == 4
  with pytest.raises(ValueError, match="mask_id"):
    data.get_tokenizer("sentencepiece", prefix + ".model", str(tmp_path), None, 100, mask_id=7)
  with pytest.raises(ValueError, match=rf"{tok.vocab_size}.*\b20\b"):
    data.get_tokenizer("sentencepiece", prefix + ".model", str(tmp_path), None, vocab_size=20)


def test_sentencepiece_corrupt_or_missing_model(tmp_path):
  workdir = tmp_path / "work"
  (workdir / "tokenizer").mkdir(parents=True)
  bad = workdir / "tokenizer" / "spm.model"
  bad.write_bytes(b"definitely not a sentencepiece model")
  with pytest.raises(ValueError, match="spm.model"):
    data.get_tokenizer("sentencepiece", None, str(workdir), _countdown_texts(), 128)
  with pytest.raises(ValueError, match="missing.model"):
    data.get_tokenizer("sentencepiece", str(tmp_path / "missing.model"), str(workdir), None, 128)
  with pytest.raises(ValueError, match="no texts"):
    data.get_tokenizer("sentencepiece", None, str(tmp_path / "empty"), None, 128)


def _write_hf_tokenizer(directory):
  vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[MASK]": 3, "hello": 4, "world": 5, "!": 6}
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["[PAD]", "[EOS]", "[MASK]"])
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def test_hf_tokenizer_loads_from_file_or_directory(tmp_path):
  path = _write_hf_tokenizer(str(tmp_path))
  for where in (path, str(tmp_path)):
    tok = data.get_tokenizer("hf", where, str(tmp_path), None, 16, mask_id=3, eos_id=2, pad_id=0)
    assert tok.vocab_size == 7
    assert (tok.mask_id, tok.eos_id, tok.pad_id) == (3, 2, 0)
    ids = tok.encode("hello world !")
    assert ids == [4, 5, 6]
    assert tok.decode(ids + [2, 3, 0]).split() == ["hello", "world", "!"]
  with pytest.raises(ValueError, match="mask_id"):
    data.get_tokenizer("hf", path, str(tmp_path), None, 16)
  with pytest.raises(ValueError, match="tokenizer.json"):
    data.get_tokenizer("hf", str(tmp_path / "sub"), str(tmp_path), None, 16, mask_id=3, eos_id=2,
                       pad_id=0)  # fmt: skip
  with pytest.raises(ValueError, match=r"\b7\b.*\b5\b"):
    data.get_tokenizer("hf", path, str(tmp_path), None, 5, mask_id=3, eos_id=2, pad_id=0)


def test_unknown_tokenizer_kind(tmp_path):
  with pytest.raises(ValueError, match="bytes"):
    data.get_tokenizer("bytes", None, str(tmp_path), None, 16)


# ----------------------------------------------------------------------------------------------
# SFT encoding.


class _CharTokenizer:
  """One token per character: 'a' -> 10, 'b' -> 11, ...; keeps layout tests readable."""

  vocab_size, pad_id, eos_id, mask_id = 64, 0, 3, 4

  def encode(self, text):
    return [10 + ord(ch) - ord("a") for ch in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i - 10) for i in ids if i >= 10)


def test_encode_sft_layout():
  records = [{"prompt": "ab", "answer": "c"}, {"prompt": "abcd", "answer": "dd"}]
  out = data.encode_sft(records, _CharTokenizer(), prompt_len=4, answer_len=3)
  tokens_NxT, valid_NxT, completion_NxT = out["tokens"], out["valid"], out["completion"]
  assert tokens_NxT.dtype == np.int32 and tokens_NxT.shape == (2, 7)
  assert valid_NxT.dtype == bool and completion_NxT.dtype == bool
  np.testing.assert_array_equal(tokens_NxT[0], [0, 0, 10, 11, 12, 3, 3])
  np.testing.assert_array_equal(tokens_NxT[1], [10, 11, 12, 13, 13, 13, 3])
  np.testing.assert_array_equal(valid_NxT[0], [False, False, True, True, True, True, True])
  assert valid_NxT[1].all()
  np.testing.assert_array_equal(completion_NxT, np.tile([False] * 4 + [True] * 3, (2, 1)))


def test_encode_sft_errors_on_overlong():
  tok = _CharTokenizer()
  with pytest.raises(ValueError, match=r"Record 1.*5 tokens.*prompt_len=4"):
    data.encode_sft([{"prompt": "a", "answer": "b"}, {"prompt": "abcde", "answer": "b"}], tok, 4, 3)
  with pytest.raises(ValueError, match=r"Record 0.*3 tokens.*answer_len=3"):
    data.encode_sft([{"prompt": "a", "answer": "bcd"}], tok, 4, 3)


def test_extend_and_crop_canvas_equal_encoding_at_that_length():
  tok = _CharTokenizer()
  records = [{"prompt": "ab", "answer": "c"}, {"prompt": "abcd", "answer": "dd"}]
  short = data.encode_sft(records, tok, prompt_len=4, answer_len=3)
  extended = data.extend_canvas(short, 4, tok.eos_id)
  for answer_len in (3, 5, 7):
    want = data.encode_sft(records, tok, prompt_len=4, answer_len=answer_len)
    got = data.crop_canvas(extended, 4 + answer_len)
    for key in ("tokens", "valid", "completion"):
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == want[key].dtype
  with pytest.raises(ValueError, match="extra >= 0"):
    data.extend_canvas(short, -1, tok.eos_id)


def test_canvas_length_is_a_pure_uniform_draw():
  lengths = (16, 24, 32)
  draws = [data.canvas_length(lengths, seed=0, step=s) for s in range(3000)]
  assert draws == [data.canvas_length(lengths, seed=0, step=s) for s in range(3000)]
  counts = np.array([draws.count(n) for n in lengths])
  assert counts.sum() == 3000 and np.all(np.abs(counts - 1000) < 100)  # ~6 sigma
  assert draws != [data.canvas_length(lengths, seed=1, step=s) for s in range(3000)]
  assert {data.canvas_length((16,), seed=3, step=s) for s in range(20)} == {16}


def test_encode_sft_drops_overlong_when_asked():
  tok = _CharTokenizer()
  records = [{"prompt": "a", "answer": "b"}, {"prompt": "abcde", "answer": "b"}]
  records += [{"prompt": "c", "answer": "bcd"}, {"prompt": "d", "answer": "e"}]
  out = data.encode_sft(records, tok, 4, 3, too_long="drop")
  kept = data.encode_sft([records[0], records[3]], tok, 4, 3)
  for key in ("tokens", "valid", "completion"):
    np.testing.assert_array_equal(out[key], kept[key])
  with pytest.raises(ValueError, match="no record fits"):
    data.encode_sft(records[1:3], tok, 4, 3, too_long="drop")
  with pytest.raises(ValueError, match="too_long 'cut'"):
    data.encode_sft(records, tok, 4, 3, too_long="cut")


def test_encode_sft_with_sentencepiece_countdown(tmp_path):
  problems = countdown.generate(20, seed=1)
  tok = data.get_tokenizer("sentencepiece", None, str(tmp_path), _countdown_texts(), 128)
  out = data.encode_sft(problems, tok, prompt_len=32, answer_len=16)
  for row, p in enumerate(problems):
    tokens_T = out["tokens"][row]
    assert tok.decode(tokens_T[out["valid"][row] & ~out["completion"][row]]) == p["prompt"]
    assert tok.decode(tokens_T[out["completion"][row]]) == p["answer"]
    assert tokens_T[-1] == tok.eos_id


# ----------------------------------------------------------------------------------------------
# Grain iterator.


def _row_arrays(num_rows):
  return {
    "tokens": np.arange(num_rows * 3, dtype=np.int32).reshape(num_rows, 3),
    "valid": np.ones((num_rows, 3), dtype=bool),
  }


def _row_ids(batch):
  return (batch["tokens"][:, 0] // 3).tolist()


def test_iterator_shards_are_disjoint_and_cover_data():
  num_rows, process_count = 23, 3
  seen = []
  for process_index in range(process_count):
    shard_rows = len(range(process_index, num_rows, process_count))
    it = data.make_train_iterator(
      _row_arrays(num_rows), shard_rows, seed=0, process_index=process_index,
      process_count=process_count,
    )  # fmt: skip
    batch = next(it)
    assert set(batch) == {"tokens", "valid"}
    assert batch["tokens"].shape == (shard_rows, 3) and batch["tokens"].dtype == np.int32
    rows = _row_ids(batch)
    assert sorted(rows) == list(range(process_index, num_rows, process_count))
    seen.extend(rows)
  assert sorted(seen) == list(range(num_rows))


def test_iterator_epochs_reshuffle_and_drop_remainder():
  it = data.make_train_iterator(_row_arrays(10), batch_size=4, seed=1)
  epochs = []
  for _ in range(4):
    # 10 rows / 4 -> 2 batches per epoch, 2 rows dropped per epoch.
    rows = _row_ids(next(it)) + _row_ids(next(it))
    assert len(set(rows)) == 8
    epochs.append(tuple(rows))
  assert len(set(epochs)) == 4
  it_same = data.make_train_iterator(_row_arrays(10), batch_size=4, seed=1)
  assert tuple(_row_ids(next(it_same)) + _row_ids(next(it_same))) == epochs[0]
  it_other = data.make_train_iterator(_row_arrays(10), batch_size=4, seed=2)
  assert tuple(_row_ids(next(it_other)) + _row_ids(next(it_other))) != epochs[0]


def test_iterator_without_shuffle_is_in_order():
  it = data.make_train_iterator(_row_arrays(6), batch_size=3, seed=0, shuffle=False)
  assert [_row_ids(next(it)) for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_iterator_exact_resume_after_json_round_trip():
  arrays = _row_arrays(11)
  reference = data.make_train_iterator(arrays, batch_size=3, seed=5)
  expected = [_row_ids(next(reference)) for _ in range(12)]

  it = data.make_train_iterator(arrays, batch_size=3, seed=5)
  for _ in range(5):
    next(it)
  saved = json.dumps(data.iterator_state_to_json(it))
  raw_saved = json.dumps(it.get_state())

  resumed = data.make_train_iterator(arrays, batch_size=3, seed=5)
  data.restore_iterator_state(resumed, json.loads(saved))
  assert [_row_ids(next(resumed)) for _ in range(7)] == expected[5:]

  raw_resumed = data.make_train_iterator(arrays, batch_size=3, seed=5)
  raw_resumed.set_state(json.loads(raw_saved))
  batch = next(raw_resumed)
  assert _row_ids(batch) == expected[5]
  np.testing.assert_array_equal(batch["valid"], np.ones((3, 3), dtype=bool))


def test_iterator_argument_errors():
  with pytest.raises(ValueError, match="batch_size=5"):
    data.make_train_iterator(_row_arrays(8), batch_size=5, seed=0, process_index=0,
                             process_count=2)  # fmt: skip
  with pytest.raises(ValueError, match="process_index"):
    data.make_train_iterator(_row_arrays(8), batch_size=1, seed=0, process_index=2,
                             process_count=2)  # fmt: skip
  with pytest.raises(ValueError, match="same number of rows"):
    data.make_train_iterator({"a": np.zeros(4), "b": np.zeros(5)}, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="next_index"):
    data.restore_iterator_state(data.make_train_iterator(_row_arrays(4), 2, seed=0), {"x": 1})
