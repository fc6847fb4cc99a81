"""data.load_tokenizer on a SentencePiece tokenizer.model (Vicuna ships no tokenizer.json).

The oracle is the sentencepiece package itself (test-only): small BPE models trained here with
Llama's trainer settings must give identical ids and identical decoded text on edge-case strings,
and the LLaVA prompt with <image> must give the ids of LLaVA's tokenizer_image_token over HF's
sentencepiece-backed LlamaTokenizer. The reader of the protobuf file, its refusals and the Vicuna
folder layout are tested on .model bytes written by hand, without sentencepiece."""

import json
import random
import struct

import pytest
import torch

import checkpoint
from checkpoint import load_llama
from data import (conversation_prompt, encode_example, load_tokenizer, mimic_question, read_sentencepiece_model,
                  tokenize_with_image, tokenizer_file)
from model import IMAGE_TOKEN_INDEX, Llama, LlamaConfig

# ---------------------------------------------------------------------------------------------
# .model bytes by hand: a protobuf writer for the few fields the reader looks at

TRAINER_FIELDS = {"model_type": 3, "treat_whitespace_as_suffix": 24, "byte_fallback": 35,
                  "unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43}
NORMALIZER_FIELDS = {"name": 1, "precompiled_charsmap": 2, "add_dummy_prefix": 3,
                     "remove_extra_whitespaces": 4, "escape_whitespaces": 5}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
WORDS = ("▁", "t", "h", "e", "a", "▁t", "he", "▁the", "▁a")  # in merge order: highest score first


def pb_varint(n):
    n &= (1 << 64) - 1  # a negative int32 is written as its 64-bit two's complement
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def pb(number, value):
    if isinstance(value, float):
        return pb_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):  # bools too
        return pb_varint(number << 3) + pb_varint(int(value))
    value = value.encode() if isinstance(value, str) else value
    return pb_varint(number << 3 | 2) + pb_varint(len(value)) + value


def model_bytes(trainer=(), normalizer=(), extra_pieces=()):
    """A Llama-like BPE model: <unk> <s> </s>, 256 byte pieces, then WORDS (scores -0, -1, ...)."""
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [(w, -float(i), NORMAL) for i, w in enumerate(WORDS)] + list(extra_pieces)
    trainer = {**dict(model_type=2, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1), **dict(trainer)}
    normalizer = {**dict(name="identity", precompiled_charsmap=b"", add_dummy_prefix=True,
                         remove_extra_whitespaces=False), **dict(normalizer)}
    out = b"".join(pb(1, pb(1, p) + pb(2, s) + pb(3, t)) for p, s, t in pieces)
    out += pb(2, b"".join(pb(TRAINER_FIELDS[k], v) for k, v in trainer.items()))
    return out + pb(3, b"".join(pb(NORMALIZER_FIELDS[k], v) for k, v in normalizer.items()))


def write_model(path, data=None, **kw):
    path.write_bytes(model_bytes(**kw) if data is None else data)
    return path


def test_reader_fields(tmp_path):
    model = read_sentencepiece_model(write_model(tmp_path / "tokenizer.model"))
    assert len(model["pieces"]) == 3 + 256 + len(WORDS)
    assert model["pieces"][-1] == dict(piece="▁a", score=-8.0, type=NORMAL)
    assert model["trainer_spec"] == dict(model_type=2, treat_whitespace_as_suffix=False, byte_fallback=True,
                                         unk_id=0, bos_id=1)  # pad_id -1 (10 bytes) read and skipped
    assert model["normalizer_spec"]["name"] == "identity" and model["normalizer_spec"]["add_dummy_prefix"]


def test_hand_written_model_merges_and_byte_fallback(tmp_path):
    tok = load_tokenizer(write_model(tmp_path / "tokenizer.model").parent)  # the folder: no tokenizer.json
    ids = {w: tok.token_to_id(w) for w in WORDS}
    assert tok.encode("the").ids == [1, ids["▁the"]]
    assert tok.encode("the ate", add_special_tokens=False).ids == [ids["▁the"], ids["▁a"], ids["t"], ids["e"]]
    # "é" is no piece: its UTF-8 bytes C3 A9 are the byte pieces 3 + 0xC3, 3 + 0xA9
    assert tok.encode("é", add_special_tokens=False).ids == [ids["▁"], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode(" the é</s>").ids, skip_special_tokens=True) == " the é"
    assert tok.token_to_id("</s>") == 2 and tok.get_vocab_size() == 3 + 256 + len(WORDS)


@pytest.mark.parametrize("change, field", [
    (dict(trainer=dict(model_type=1)), "trainer_spec.model_type is UNIGRAM"),
    (dict(trainer=dict(model_type=4)), "trainer_spec.model_type is CHAR"),
    (dict(trainer=dict(byte_fallback=False)), "trainer_spec.byte_fallback is false"),
    (dict(trainer=dict(treat_whitespace_as_suffix=True)), "trainer_spec.treat_whitespace_as_suffix is true"),
    (dict(trainer=dict(unk_id=5)), "trainer_spec.unk_id 5 is not an UNKNOWN piece"),
    (dict(normalizer=dict(remove_extra_whitespaces=True)), "normalizer_spec.remove_extra_whitespaces is true"),
    (dict(normalizer=dict(name="nmt_nfkc", precompiled_charsmap=b"\x01\x02")),
     "normalizer_spec has a precompiled_charsmap ('nmt_nfkc')"),
    (dict(extra_pieces=[("<image>", 0.0, USER_DEFINED)]), "pieces include USER_DEFINED ones"),
])
def test_unsupported_models_are_refused(tmp_path, change, field):
    path = write_model(tmp_path / "tokenizer.model", **change)
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {field};") and "only BPE with byte_fallback" in msg and "\n" not in msg


def test_corrupt_and_truncated_files(tmp_path):
    good = model_bytes()
    path = tmp_path / "tokenizer.model"
    cuts = [good[:n] for n in range(0, len(good), 37)] + [good[:-1]]
    for data in cuts + [b"sentencepiece", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]:
        write_model(path, data)
        with pytest.raises(ValueError, match="SentencePiece model") as e:
            load_tokenizer(tmp_path)  # the folder: the message names the file in it
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    for data, why in ((pb(1, pb(1, b"\xff\xfe")) + good, "can't decode byte"),  # a piece that is not UTF-8
                      (pb(1, pb(1, "x") + pb(2, 5)) + good, "field score has the wrong wire type")):
        write_model(path, data)
        with pytest.raises(ValueError, match=f"not a readable SentencePiece model \\(.*{why}"):
            load_tokenizer(path)


def test_which_file_a_folder_gives(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    write_model(tmp_path / "tokenizer.model")
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer.json wins
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"


# ---------------------------------------------------------------------------------------------
# Vicuna-7B-v1.5's file layout, with tiny random weights


def write_vicuna_folder(folder):
    folder.mkdir()
    write_model(folder / "tokenizer.model")
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(vocab_size=3 + 256 + len(WORDS))).eval()
    cfg = {**checkpoint.hf_config(model.config), "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
           "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True}
    cfg.pop("rope_theta", None)  # Vicuna's config predates the field
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096, "temperature": 0.9,
         "top_p": 0.6}))
    special = {name: {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False}
               for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
         "legacy": False, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
         "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}))
    sd, weight_map = model.state_dict(), {}
    keys = list(sd)
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": weight_map}))
    return model


def test_vicuna_layout_loads_model_and_tokenizer(tmp_path):
    folder = tmp_path / "vicuna-7b-v1.5"
    ours = write_vicuna_folder(folder)
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted([
        "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"])
    tok, model = load_tokenizer(folder), load_llama(folder)
    assert tok.get_vocab_size() == model.config.vocab_size and tok.token_to_id("</s>") == 2
    ids = tokenize_with_image(tok, conversation_prompt(mimic_question("cough")))
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    x = torch.tensor([[i for i in ids if i >= 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=0, rtol=0)
    assert sorted(p.name for p in folder.iterdir()) == files  # nothing added, no tokenizer.json written


# ---------------------------------------------------------------------------------------------
# Parity with sentencepiece on models trained here

LLAMA_TRAINER = dict(model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                     normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                     unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995, minloglevel=2)
MODELS = {  # name: trainer settings on top of Llama's
    "llama_600": dict(vocab_size=600),
    "llama_350": dict(vocab_size=350),
    "control_pad": dict(vocab_size=500, pad_id=3, control_symbols=["<mask>"]),
    "no_dummy_prefix": dict(vocab_size=500, add_dummy_prefix=False),
}
STRINGS = [
    "", " ", "  ", "     ", " leading", "trailing ", "  both  ", "a  b   c    d", "\n", "line one\nline two\n",
    "\ttab\tand  \n mixed \t\n", "1234567890", "pi is 3.14159265358979 and 2024-01-05", "x=12,y=-7.5%",
    "Hello, world! (a) [b] {c}; \"q\" 'x' -- ... ?!", "Привет, мир", "مرحبا بالعالم", "胸部X光片显示心脏大小正常。",
    "😀🎉 emoji 👍🏽", "ÉCOLE À Ça Ø Ünter", "naïve café résumé", "▁already▁escaped ▁",
    "The heart size is normal. No focal consolidation, pleural effusion or pneumothorax. 3 mm nodule.",
    "No acute cardiopulmonary process.\n\nIMPRESSION:  stable   bibasilar atelectasis",
]


def corpus():
    words = ("the heart size is normal no acute cardiopulmonary process lungs are clear there is no pleural "
             "effusion or pneumothorax mild atelectasis at the left base stable nodule fever cough").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + rng.choice([".", "", " 12 mm."])
             for _ in range(1500)]
    lines += ["Привет мир как дела", "مرحبا بالعالم", "胸部X光片显示心脏大小正常", "École Ça État naïve",
              "a  b   c    d", "x\ty\tz", "IMPRESSION:  stable"] * 20
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder, lines, out = tmp_path_factory.mktemp("spm"), corpus(), {}
    for name, settings in MODELS.items():
        (folder / name).mkdir()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / name / "tokenizer"),
                                       **{**LLAMA_TRAINER, **settings})
        path = folder / name / "tokenizer.model"
        out[name] = (path, spm.SentencePieceProcessor(model_file=str(path)), load_tokenizer(path.parent))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_ids_and_text_match_sentencepiece(trained, name):
    _, sp, tok = trained[name]
    assert tok.get_vocab_size() == sp.get_piece_size()
    for text in STRINGS:
        want = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == want, text
        assert tok.encode(text).ids == [sp.bos_id()] + want, text
        assert tok.decode([sp.bos_id()] + want, skip_special_tokens=True) == sp.decode(want), text
        if name != "no_dummy_prefix" and "▁" not in text:  # identity normalization: lossless round trip
            assert sp.decode(want) == text


def slow_llama_ids(sp, text, specials=("<s>", "</s>", "<unk>")):
    """HF's LlamaTokenizer (sentencepiece-backed, legacy) with add_bos: special tokens are split out
    of the text first, each piece of text between them goes to sentencepiece on its own."""
    ids, rest = [sp.bos_id()], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s in rest]
        at, special = min(hits) if hits else (len(rest), None)
        ids += sp.encode(rest[:at]) if rest[:at] else []
        if special:
            ids.append(sp.piece_to_id(special))
            at += len(special)
        rest = rest[at:]
    return ids


def llava_tokenizer_image_token(sp, prompt):
    """LLaVA's tokenizer_image_token: each chunk between <image> markers tokenised on its own with
    BOS, one BOS kept at the start, IMAGE_TOKEN_INDEX in between."""
    chunks = [slow_llama_ids(sp, chunk) for chunk in prompt.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk[1:]
    return ids


@pytest.mark.parametrize("name", ["llama_600", "llama_350"])
def test_llava_prompt_matches_tokenizer_image_token(trained, name):
    _, sp, tok = trained[name]
    question, answer = mimic_question("Fever and cough.  R/O pneumonia"), "The heart size is normal. 2 cm nodule."
    for text in (conversation_prompt(question), conversation_prompt(question, answer),
                 conversation_prompt("Compare <image>\nwith <image>\n", answer)):
        assert tokenize_with_image(tok, text) == llava_tokenizer_image_token(sp, text), text
    input_ids, labels = encode_example(tok, question, answer)  # prompt and labels agree; </s> is one eos
    assert input_ids[-1] == sp.eos_id() and labels[-1] == sp.eos_id()
    assert tok.decode([i for i, l in zip(input_ids, labels) if l >= 0], skip_special_tokens=True) == answer


def test_unigram_model_is_refused(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "tokenizer"),
                                   model_type="unigram", vocab_size=100, minloglevel=2)
    with pytest.raises(ValueError, match="trainer_spec.model_type is UNIGRAM; only BPE"):
        load_tokenizer(tmp_path)


def test_bpe_without_byte_fallback_is_refused(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "tokenizer"),
                                   **{**LLAMA_TRAINER, "byte_fallback": False, "vocab_size": 300})
    with pytest.raises(ValueError, match="trainer_spec.byte_fallback is false"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_merges_and_vocab_match_transformers_converter(trained):
    """Second oracle: the vocabulary and ranked merges that transformers derives from the same file."""
    pytest.importorskip("google.protobuf")
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    from tokenizers.models import BPE
    for path, _, tok in trained.values():
        extractor = converter.SentencePieceExtractor(str(path))
        try:
            kw = extractor.extract(BPE)  # transformers >= 5
            vocab, merges = kw["vocab"], kw["merges"]
        except TypeError:
            vocab, merges = extractor.extract()
        ours = json.loads(tok.to_str())["model"]
        assert ours["vocab"] == vocab
        assert [tuple(m) for m in ours["merges"]] == [tuple(m[:2]) for m in merges]
