"""One fine-tuned run, three ways to ask it: `tunesmith chat`, the server, the exported HF folder
through plain transformers. At temperature 0 they must say the same thing and stop at EOS."""

import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.cli.main import main
from tunesmith.config.load import build_config
from tunesmith.recipes.sft import run_sft
from tunesmith.serve.app import create_app
from tunesmith.serve.load import build_served
from helpers import tiny_tree

PROMPT = "Count to 6."


def test_chat_server_and_exported_folder_agree_and_stop(tiny_model_dir, chat_file, tmp_path, capsys):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "full", max_steps=60, log_every=20, lr=3e-3)
    run_dir = run_sft(build_config(tree)).run_dir
    capsys.readouterr()

    assert main(["-q", "chat", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "40"]) == 0
    chat_text = capsys.readouterr().out.rstrip("\n")

    served = build_served(str(run_dir), {}, "cpu", max_tokens=40)
    with TestClient(create_app(served)) as http:
        answer = http.post("/v1/chat/completions", json={"model": "tiny", "temperature": 0, "max_tokens": 40,
                                                         "messages": [{"role": "user", "content": PROMPT}]}).json()
    served_text = answer["choices"][0]["message"]["content"]

    assert main(["export", str(run_dir), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
    exported_text = tokenizer.decode(output, skip_special_tokens=True)

    assert chat_text == served_text == exported_text
    assert exported_text.startswith("1 2 3 4")  # it learned the task (a tiny model miscounts the end)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert output[-1].item() == tokenizer.eos_token_id and len(output) < 40  # it ended itself: no run-on
