"""generate.py's command line: a greedy continuation from a Llama folder, and one-line refusals.
(generate() itself is checked against HF transformers in test_model.py.)"""

import pytest
import torch

import generate as G
from checkpoint import load_llama, save_llama
from model import Llama, LlamaConfig
from synthetic import train_tokenizer

PROMPT = "The heart is normal in size and the lungs are clear."


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A tiny random Llama in the HF layout with its tokenizer.json beside the weights."""
    folder = tmp_path_factory.mktemp("llm")
    tok = train_tokenizer([PROMPT, "No pleural effusion or pneumothorax. The mediastinum is unremarkable."],
                          vocab_size=150)
    torch.manual_seed(0)
    save_llama(Llama(LlamaConfig.tiny(vocab_size=tok.get_vocab_size())), folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, tok


def test_cli_prints_the_greedy_continuation(llm_folder, capsys):
    folder, tok = llm_folder
    got = G.main(["--llm", str(folder), "--prompt", PROMPT, "--max-new-tokens", "9", "--device", "cpu"])
    ids = tok.encode(PROMPT).ids
    assert ids[0] == tok.token_to_id("<s>")  # the BOS, as data.py encodes prompts
    llm = load_llama(folder).eval()
    want = G.generate(llm, [ids], max_new_tokens=9, eos_token_id=llm.config.eos_token_id,
                      pad_token_id=llm.config.pad_token_id)[0]
    assert got == want and 0 < len(got) <= 9
    assert capsys.readouterr().out == tok.decode(want) + "\n"
    # the same with the tokenizer named explicitly
    assert G.main(["--llm", str(folder), "--prompt", PROMPT, "--max-new-tokens", "9", "--device", "cpu",
                   "--tokenizer", str(folder / "tokenizer.json")]) == want


@pytest.mark.parametrize("flags, message", [
    (["--llm", "{folder}/missing"], "missing: no such file or folder"),
    (["--llm", "{folder}", "--tokenizer", "{folder}/config.json"], "not a readable tokenizers file"),
    (["--llm", "{folder}", "--max-new-tokens", "600"], "exceed the model's 512 positions"),
    (["--llm", "{folder}", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
])
def test_cli_refuses_bad_input_in_one_line(llm_folder, capsys, flags, message):
    folder, _ = llm_folder
    with pytest.raises(SystemExit) as e:
        G.main([f.format(folder=folder) for f in flags] + ["--prompt", PROMPT, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert message in err
