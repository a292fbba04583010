"""LLaVA data: the prompt template, loss only on the assistant's tokens, bad records, and synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phiforge.errors import DataError
from phiforge.model import Phi2, Phi2Config
from phiforge.tokenizer import builtin_tokenizer, eot_id
from phiforge.vision.config import EncoderConfig, VisionConfig
from phiforge.vision.data import VisionDataset, encode_conversation, format_turn, prompt_ids, read_records
from phiforge.vision.model import VisionLM
from phiforge.vision.synth import synthesize

TOK = builtin_tokenizer()
ENC = EncoderConfig(type="conv", image_size=32, dim=16)
TURNS = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a circle"}]


def record(i: int, image: str) -> dict:
    return {"id": f"r{i}", "image": image, "conversations": TURNS}


@pytest.fixture
def data_dir(tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    recs = [record(0, "ok.png"), record(1, "missing.png"), record(2, "broken.png"), record(3, "ok.png")]
    (tmp_path / "data.json").write_text(json.dumps(recs), encoding="utf-8")
    return tmp_path


def test_prompt_template():
    text = "".join(format_turn(t, first=j == 0) for j, t in enumerate(TURNS))
    assert text == "USER: What color is it?\nASSISTANT: red\nUSER: And the shape?\nASSISTANT: a circle"
    assert TOK.decode(prompt_ids(TOK, "<image>\nWhat color is it?")) == "USER: What color is it?\nASSISTANT:"


def test_loss_only_on_assistant_tokens():
    ids, labels = encode_conversation(TOK, TURNS)
    eot = eot_id(TOK)
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    assert TOK.decode(supervised, skip_special_tokens=False) == " red<|endoftext|> a circle<|endoftext|>"
    assert supervised.count(eot) == 2


def test_dataset_targets_and_model_loss(data_dir):
    ds = VisionDataset(data_dir / "data.json", TOK, ENC, max_len=64)
    visual, idx, labels = ds.batch([0, 1])
    assert visual.shape == (2, 3, 32, 32) and visual.dtype == torch.uint8
    full_ids, full_labels = encode_conversation(TOK, TURNS)
    assert idx[0].tolist() == full_ids[:-1] and labels[0].tolist() == full_labels[1:]  # next-token targets
    torch.manual_seed(0)
    lm = Phi2(Phi2Config(vocab_size=50257, n_layer=2, n_embd=32, n_head=2, intermediate_size=64,
                         max_seq_len=64, xattn={"every": 1}))
    model = VisionLM(lm, VisionConfig(encoder=ENC)).eval()
    logits = lm(idx, context=model.encode(visual))
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(visual, idx, labels).lm_loss, expected)


def test_missing_and_unreadable_images_are_skipped_and_counted(data_dir):
    ds = VisionDataset(data_dir / "data.json", TOK, ENC, max_len=64)
    assert len(ds) == 2
    assert ds.stats["missing_image"] == 1 and ds.stats["unreadable_image"] == 1 and ds.stats["records"] == 4


def test_truncation_that_drops_every_answer_is_counted(data_dir):
    with pytest.raises(DataError, match="no usable records .*'too_long': 2"):
        VisionDataset(data_dir / "data.json", TOK, ENC, max_len=5)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": "a", "image": "x.png",\n  "conversations": [}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 3"):
        read_records(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(record(0, "x.png")) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: malformed json line"):
        read_records(lines)


@pytest.mark.parametrize("bad, message", [
    ({"id": "q", "image": "x.png"}, r"record 1 \(id 'q'\): 'conversations'"),
    ({"id": "q", "conversations": [{"from": "robot", "value": "hi"}]}, r"record 1 \(id 'q'\): conversations\[0\]"),
    ({"id": "q", "conversations": [{"from": "human", "value": "hi"}]}, r"record 1 \(id 'q'\): no 'gpt' turn"),
    ("just a string", r"record 1: expected an object"),
])
def test_malformed_record_names_the_record(tmp_path, bad, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record(0, "x.png"), bad]), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_synth_is_deterministic_and_held_out(tmp_path):
    a = synthesize(tmp_path / "a", n=20, seed=3)
    b = synthesize(tmp_path / "b", n=20, seed=3)
    synthesize(tmp_path / "c", n=20, seed=4)
    assert a == b and a["train"] == 18 and a["heldout"] == 2
    for name in ("train.json", "heldout.json", "images/000007.png", "images/000019.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()
    train, held = read_records(tmp_path / "a" / "train.json"), read_records(tmp_path / "a" / "heldout.json")
    assert not {r["image"] for r in train} & {r["image"] for r in held}
    kinds = [t["kind"] for t in held[0]["conversations"] if t["from"] == "human"]
    assert sorted(kinds) == ["color", "count", "position", "shape"]
    facts = held[0]["facts"]
    answers = {q["kind"]: a["value"] for q, a in zip(held[0]["conversations"][::2], held[0]["conversations"][1::2])}
    assert answers == facts
