"""Data (data.py): attribute codes, the tokenizer and template, label masking, images, batches, the
resampling/reweighting baselines, bad input, the converters and the command line. The synthetic
benchmark has its own tests (test_synthetic.py)."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
from data import (ATTRIBUTES, SYSTEM_PROMPT, DataError, GroupBalancedSampler, ImageProcessor,
                  ReportDataset, collate, conversation_prompt, encode_example, group_labels,
                  inverse_frequency_weights, load_tokenizer, read_llava_json, tokenize_with_image)
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VisionConfig
from synthetic import SyntheticConfig, make_synthetic


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    splits = make_synthetic(out, SyntheticConfig(n_pretrain=30, n_train=30, n_val=4, n_test=4, n_swap=2, size=32,
                                                 vocab_size=300))
    return out, splits


@pytest.fixture(scope="module")
def demo_tok(demo):
    return load_tokenizer(demo[0])


# ---------------------------------------------------------------------------------------------
# Attribute codes


def test_attribute_encodings():
    assert [data.encode_race(r) for r in ("White", "black", "asian", "hispanic", "other",
                                          "american indian/alaska native", "native hawaiian/pacific islander",
                                          "unknown", "declined", "")] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]
    assert data.encode_race("unknown", unknown_race="mask") == -1 and data.encode_race("", "mask") == -1
    assert [data.encode_gender(g) for g in ("M", "F", "male", "Female")] == [0, 1, 0, 1]
    # MIMIC bins [0,44], (44,65], (65,inf); HAM cut-offs 45 / 66
    assert [data.age_group(a) for a in (0, 44, 44.5, 65, 65.5, 90)] == [0, 0, 1, 1, 2, 2]
    assert [data.age_group(a, "ham") for a in (40, 44.5, 45, 65, 66, 85)] == [0, 0, 1, 1, 2, 2]
    assert [data.race_major(r) for r in ("WHITE - RUSSIAN", "BLACK/AFRICAN AMERICAN", "ASIAN - CHINESE",
                                         "HISPANIC/LATINO - PUERTO RICAN", "UNABLE TO OBTAIN",
                                         "PATIENT DECLINED TO ANSWER", "MULTIPLE RACE/ETHNICITY", "")] == \
        ["white", "black", "asian", "hispanic", "unknown", "unknown", "other", "unknown"]
    assert {a: s.num_classes for a, s in ATTRIBUTES.items()} == {"race": 9, "age": 3, "gender": 2}
    for bad, fn in (("martian", data.encode_race), ("X", data.encode_gender), ("nan", data.age_group),
                    (None, data.age_group), ("3", data.encode_age_group)):
        with pytest.raises(ValueError):
            fn(bad)


# ---------------------------------------------------------------------------------------------
# Tokenizer and template


def llama_like_tokenizer(path):
    """A small Llama-style tokenizer.json (Metaspace pre-tokenizer, <s> prepended) for tests."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    text = [conversation_prompt("<image>\nDescribe the findings.", "No acute findings. Heart size normal.")] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


def test_tokenizer_image_sentinel(tmp_path):
    tok = load_tokenizer(llama_like_tokenizer(tmp_path / "tokenizer.json"))
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    text = conversation_prompt("<image>\nDescribe the findings.")
    assert text.startswith("A chat between") and text.endswith("USER: <image>\nDescribe the findings. ASSISTANT:")
    ids = tokenize_with_image(tok, text)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    before, after = text.split("<image>")
    i = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[:i] == tok.encode(before).ids and ids[i + 1:] == tok.encode(after).ids[1:]
    assert tokenize_with_image(tok, "no image here") == tok.encode("no image here").ids


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Prompt and labels


def word_tokenizer(words):
    """A word-level tokenizer with known ids: <unk> 0, <s> 1, </s> 2, then `words` from 3."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_label_masking_worked_example():
    # USER: 3, ASSISTANT: 4, Describe. 5, Clear 6, lungs. 7; the system prompt's words are all <unk> 0
    tok = word_tokenizer(["USER:", "ASSISTANT:", "Describe.", "Clear", "lungs."])
    n = len(SYSTEM_PROMPT.split())
    ids, labels = encode_example(tok, "<image>\nDescribe.", "Clear lungs.")
    #            BOS  system     USER: <image>  Describe. ASSISTANT: Clear lungs. </s>
    assert ids == [1] + [0] * n + [3, IMAGE_TOKEN_INDEX, 5, 4, 6, 7, 2]
    assert labels == [IGNORE_INDEX] * (1 + n + 4) + [6, 7, 2]
    # truncation keeps the start (and the image sentinel), cutting the answer's tail
    ids, labels = encode_example(tok, "<image>\nDescribe.", "Clear lungs.", max_length=n + 6)
    assert ids == [1] + [0] * n + [3, IMAGE_TOKEN_INDEX, 5, 4, 6] and labels[-1] == 6 and len(labels) == n + 6
    with pytest.raises(DataError, match="cuts off the image sentinel"):
        encode_example(tok, "<image>\nDescribe.", "Clear lungs.", max_length=n + 1, item_id="x1")


def test_labels_with_demo_tokenizer_match_full_conversation(demo, demo_tok):
    _, splits = demo
    for item in splits["train"][:30]:
        q, a = item["conversations"][0]["value"], item["conversations"][1]["value"]
        ids, labels = encode_example(demo_tok, q, a)
        prompt = tokenize_with_image(demo_tok, conversation_prompt(q))
        assert ids == tokenize_with_image(demo_tok, conversation_prompt(q, a))
        assert ids[:len(prompt)] == prompt and ids[0] == 1 and ids[-1] == 2 and ids.count(IMAGE_TOKEN_INDEX) == 1
        assert 0 not in ids  # no <unk>: the alphabet covers the text
        assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
        # the supervised part is the answer encoded on its own (leading space, no BOS) + </s>
        assert labels[len(prompt):-1] == demo_tok.encode(" " + a, add_special_tokens=False).ids
        assert demo_tok.decode(labels[len(prompt):-1]) == a


def test_tokenizer_that_merges_across_the_boundary_is_refused():
    # "ASSISTANT: Clear" as one word-level token: the prompt is then not a prefix of the conversation
    tok = word_tokenizer(["USER:", "ASSISTANT:", "Describe."])
    tok.add_tokens([": Clear"])
    with pytest.raises(DataError, match="item 'z9'"):
        encode_example(tok, "<image>\nDescribe.", "Clear", item_id="z9")


# ---------------------------------------------------------------------------------------------
# Images


def test_image_processor_normalises_grayscale_rgb_and_16bit():
    mean, std = torch.tensor(VisionConfig.mean).view(3, 1, 1), torch.tensor(VisionConfig.std).view(3, 1, 1)
    gray = Image.fromarray(np.full((20, 40), 128, np.uint8))  # non-square grayscale
    x = ImageProcessor(size=16)(gray)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, ((128 / 255 - mean) / std).expand(3, 16, 16))
    rgb = Image.fromarray(np.tile(np.array([255, 0, 51], np.uint8), (12, 12, 1)))
    torch.testing.assert_close(ImageProcessor(size=8)(rgb), ((torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1) - mean) / std).expand(3, 8, 8))
    deep = Image.fromarray(np.full((10, 10), 4095, np.uint16))  # 12-bit values in a 16-bit PNG
    torch.testing.assert_close(ImageProcessor(size=4)(deep), ((1 - mean) / std).expand(3, 4, 4))


def test_image_processor_center_crops_the_long_side():
    a = np.zeros((10, 30), np.uint8)
    a[:, 10:20] = 255  # only the middle third is white
    x = ImageProcessor(size=10, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(a))
    torch.testing.assert_close(x, torch.ones(3, 10, 10))
    a = np.zeros((30, 10), np.uint8)  # tall image: the crop is vertical
    a[10:20] = 255
    torch.testing.assert_close(ImageProcessor(size=10, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(a)), torch.ones(3, 10, 10))


# ---------------------------------------------------------------------------------------------
# Dataset and batch


def test_dataset_and_collate_produce_the_batch_format(demo, demo_tok):
    out, _ = demo
    recs = read_llava_json(out / "train.json")[:3]
    ds = ReportDataset(recs, demo_tok, ImageProcessor(size=32), sample_weights=[0.5, 1.0, 1.5])
    items = [ds[i] for i in range(3)]
    b = collate(items, pad_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "attrs", "ids", "sample_weight"}
    lengths = [len(it["input_ids"]) for it in items]
    T = max(lengths)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    assert b["pixel_values"].shape == (3, 3, 32, 32) and b["ids"] == [r["id"] for r in recs]
    for i, n in enumerate(lengths):
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["input_ids"][i, n:].eq(0).all() and b["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert b["input_ids"][i, :n].tolist() == items[i]["input_ids"].tolist()
    for a in ATTRIBUTES:
        assert b["attrs"][a].dtype == torch.long and b["attrs"][a].tolist() == [r["attrs"][a] for r in recs]
    assert b["sample_weight"].tolist() == [0.5, 1.0, 1.5]
    assert "sample_weight" not in collate([ReportDataset(recs, demo_tok, ImageProcessor(size=32))[0]])


# ---------------------------------------------------------------------------------------------
# Baselines: resampling and reweighting


def test_group_balanced_sampler_makes_groups_uniform():
    groups = [(0,)] * 700 + [(1,)] * 200 + [(2,)] * 100
    s = GroupBalancedSampler(groups, num_samples=30000, seed=0)
    # exactly uniform in expectation: each group's total draw probability is 1/3
    p = s.p / s.p.sum()
    for g in range(3):
        assert abs(sum(p[i].item() for i in range(1000) if groups[i] == (g,)) - 1 / 3) < 1e-9
    freq = Counter(groups[i] for i in s)
    assert all(abs(freq[(g,)] / 30000 - 1 / 3) < 0.02 for g in range(3)), freq  # vs 0.7/0.2/0.1 unbalanced


def test_group_balanced_sampler_distributed_shares_are_disjoint():
    groups = [(0,)] * 80 + [(1,)] * 20
    ranks = [GroupBalancedSampler(groups, num_samples=100, rank=r, world_size=3, seed=3) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(x) for x in shares] == [34, 34, 34]  # 100 padded to 102
    merged = [shares[i % 3][i // 3] for i in range(102)]  # interleave back: one draw, split by position
    assert merged == list(GroupBalancedSampler(groups, num_samples=102, seed=3))
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != shares[0] and list(ranks[0]) == list(ranks[0])
    with pytest.raises(ValueError, match="rank 3"):
        GroupBalancedSampler(groups, rank=3, world_size=3)


def test_inverse_frequency_weights_and_joint_groups():
    w = inverse_frequency_weights([("a",), ("a",), ("a",), ("b",)])
    torch.testing.assert_close(w, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))  # N / (G n_g): 4/(2*3), 4/(2*1)
    recs = [dict(attrs=dict(race=r, age=0, gender=g)) for r, g in ((0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (1, 0))]
    joint = group_labels(recs, ("race", "gender"))
    assert joint == [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (1, 0)] and group_labels(recs, "race")[3] == (1,)
    w = inverse_frequency_weights(joint)  # 3 groups, sizes 2, 1, 3: each carries total weight 6/3 = 2
    assert abs(w.mean().item() - 1) < 1e-6
    for g in set(joint):
        assert abs(sum(wi for wi, k in zip(w.tolist(), joint) if k == g) - 2) < 1e-6
    with pytest.raises(KeyError, match="ethnicity"):
        group_labels(recs, ("race", "ethnicity"))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the item and the field, or skipped and counted


def write_set(tmp_path, spoil=None):
    """Three MIMIC items with real images; `spoil` edits the last one ("bad_2")."""
    (tmp_path / "img").mkdir(exist_ok=True)
    items = []
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        items.append(dict(id=f"ok_{i}" if i < 2 else "bad_2", image=f"img/{i}.png", race_major="white",
                          anchor_age_group=1, gender="F",
                          conversations=[{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Clear."}]))
    if spoil:
        spoil(items[2], tmp_path)
    (tmp_path / "set.json").write_text(json.dumps(items))
    return tmp_path / "set.json"


def garbage_image(item, root):
    (root / "img" / "2.png").write_bytes(b"not an image at all")


BAD = {
    "missing image file": (lambda it, root: it.update(image="img/missing.png"), "image", "no such file"),
    "unreadable image": (garbage_image, "image", "unreadable"),
    "missing demographic": (lambda it, root: it.pop("gender"), "gender", "missing"),
    "unknown race": (lambda it, root: it.update(race_major="martian"), "race_major", "unknown race"),
    "unknown gender": (lambda it, root: it.update(gender="X"), "gender", "unknown gender"),
    "bad age group": (lambda it, root: it.update(anchor_age_group=5), "anchor_age_group", "not 0, 1 or 2"),
    "empty answer": (lambda it, root: it["conversations"][1].update(value="  "), "conversations", "empty answer"),
    "no gpt turn": (lambda it, root: it["conversations"].pop(), "conversations", "empty answer"),
    "duplicate id": (lambda it, root: it.update(id="ok_0"), "id", "duplicate"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_item_raises_naming_item_and_field(tmp_path, case, capsys):
    spoil, field, problem = BAD[case]
    path = write_set(tmp_path, spoil)
    with pytest.raises(DataError) as e:
        read_llava_json(path)
    item_id = "ok_0" if case == "duplicate id" else "bad_2"
    assert f"item {item_id!r}" in str(e.value) and f"field {field!r}" in str(e.value) and problem in str(e.value)
    recs = read_llava_json(path, on_error="skip")  # the flag: dropped and counted in one line
    assert [r["id"] for r in recs] == ["ok_0", "ok_1"]
    assert f"skipped 1 of 3 items ({field} 1)" in capsys.readouterr().out


def test_good_set_reads_and_unknown_names_are_refused(tmp_path):
    path = write_set(tmp_path)
    recs = read_llava_json(path)
    assert recs[0]["attrs"] == dict(race=0, age=1, gender=1) and recs[0]["answer"] == "Clear."
    assert recs[0]["question"] == "<image>\nDescribe." and recs[0]["image"] == str(tmp_path / "img" / "0.png")
    with pytest.raises(ValueError, match="unknown dataset 'chexpert'"):
        read_llava_json(path, dataset="chexpert")
    (tmp_path / "img" / "0.png").unlink()  # vanished after validation: still a clear error, with the id
    with pytest.raises(DataError, match="item 'ok_0': field 'image'"):
        data.load_image(recs[0]["image"], recs[0]["id"])


# ---------------------------------------------------------------------------------------------
# Real formats: PadChest / HAM10000 items and the CSV converters


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_converters_and_readers_for_the_three_formats(tmp_path, capsys):
    for name in ("ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4", "p1.png", "p2.png", "d1.jpg"):
        Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / (name if "." in name else name + ".jpg"))
    # HAM10000_metadata.csv: unknown sex and empty age are dropped
    write_csv(tmp_path / "ham.csv", [
        dict(lesion_id="L1", image_id="ISIC_1", dx="mel", dx_type="histo", age="45.0", sex="male", localization="back"),
        dict(lesion_id="L2", image_id="ISIC_2", dx="nv", dx_type="histo", age="", sex="female", localization="face"),
        dict(lesion_id="L3", image_id="ISIC_3", dx="bkl", dx_type="histo", age="70.0", sex="unknown", localization="ear"),
        dict(lesion_id="L4", image_id="ISIC_4", dx="df", dx_type="histo", age="30.0", sex="female", localization="leg")])
    data.ham_csv_to_json(tmp_path / "ham.csv", tmp_path / "ham.json")
    assert "wrote 2 of 4 rows" in capsys.readouterr().out
    recs = read_llava_json(tmp_path / "ham.json", dataset="ham")
    assert [(r["id"], r["answer"], r["attrs"]) for r in recs] == [
        ("ISIC_1", "melanoma", dict(race=-1, age=1, gender=0)), ("ISIC_4", "dermatofibroma", dict(race=-1, age=0, gender=1))]
    # raw PadChest / HAM items without "conversations"
    (tmp_path / "raw.json").write_text(json.dumps([dict(id="p1", image="p1.png", Age=70, gender="M",
                                                        FINDINGS="Cardiomegaly.", INDICATION="Dyspnea")]))
    (r,) = read_llava_json(tmp_path / "raw.json", dataset="padchest")
    assert r["answer"] == "Cardiomegaly." and r["question"].endswith("indication: Dyspnea") and r["attrs"]["age"] == 2
    # PadChest CSV: age from PatientBirth and StudyDate_DICOM; lateral views are dropped
    write_csv(tmp_path / "pc.csv", [
        dict(ImageID="p1.png", Projection="PA", FINDINGS="Normal.", INDICATION="", PatientBirth="1950.0",
             StudyDate_DICOM="20140717", PatientSex_DICOM="F"),
        dict(ImageID="p2.png", Projection="L", FINDINGS="Normal.", INDICATION="", PatientBirth="1950.0",
             StudyDate_DICOM="20140717", PatientSex_DICOM="F")])
    data.padchest_csv_to_json(tmp_path / "pc.csv", tmp_path / "pc.json")
    (r,) = read_llava_json(tmp_path / "pc.json", dataset="padchest")
    assert r["attrs"] == dict(race=-1, age=1, gender=1) and r["question"].endswith("in the radiology image.")
    # MIMIC: joined metadata CSV -> official fields (anchor_age_group, gender, race_major)
    write_csv(tmp_path / "mimic.csv", [
        dict(dicom_id="d1", subject_id="10000032", study_id="5", ViewPosition="PA", findings="No effusion.",
             indication="Cough", anchor_age="52", gender="F", race="BLACK/AFRICAN AMERICAN", path="d1.jpg"),
        dict(dicom_id="d2", subject_id="10000032", study_id="5", ViewPosition="LATERAL", findings="x",
             indication="", anchor_age="52", gender="F", race="WHITE", path=""),
        dict(dicom_id="d3", subject_id="10000033", study_id="6", ViewPosition="AP", findings="",
             indication="", anchor_age="52", gender="F", race="WHITE", path="")])
    (item,) = data.mimic_csv_to_json(tmp_path / "mimic.csv", tmp_path / "mimic.json")
    assert (item["anchor_age_group"], item["gender"], item["race_major"]) == (1, "F", "black")
    assert "dropped: view 1, empty findings 1" in capsys.readouterr().out
    (r,) = read_llava_json(tmp_path / "mimic.json")
    assert r["attrs"] == dict(race=1, age=1, gender=1) and r["answer"] == "No effusion."


# ---------------------------------------------------------------------------------------------
# Command line


def test_check_command_prints_group_counts(demo, capsys):
    out, _ = demo
    data.main(["--check", str(out / "train.json")])
    text = capsys.readouterr().out
    assert text.startswith("check  n=   30  race: ") and "gender: " in text and "age: " in text
    for argv in ([], ["--make-demo", str(out / "again")]):  # the benchmark is synthetic.py's now
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2
    assert "nothing to do: give --check or --convert" in capsys.readouterr().err
