"""The Modelfile's Go template is derived from the Jinja chat template and checked against it."""

import copy

from tunesmith.data.tokenize import render
from tunesmith.export.ollama import chat_pieces, modelfile

# A Llama-3-style template, written for this test: a BOS-like prefix, header tokens around the role
# and an end-of-turn token after each message (spelled with tokens this vocabulary has).
LLAMA3_STYLE = (
    "{{ '<|im_start|>' }}{% for m in messages %}{{ '<|endoftext|>' + m['role'] + '<|im_end|>\n\n' + m['content'] "
    "+ '<|endoftext|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant<|im_end|>\n\n' }}"
    "{% endif %}"
)
INST_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
              "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}")


def with_template(tokenizer, template):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def test_chatml_modelfile(tokenizer):
    text = modelfile(tokenizer, "m-f16.gguf", "runs/x")
    expected = ('TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}'
                '<|im_end|>\n{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
                '{{ end }}<|im_start|>assistant\n"""')
    assert expected in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.splitlines()[2] == "FROM ./m-f16.gguf" and 'PARAMETER stop "<|im_end|>"' in text


def test_header_style_template_with_a_prefix(tokenizer):
    custom = with_template(tokenizer, LLAMA3_STYLE)
    pieces = chat_pieces(custom)
    assert pieces is not None and pieces.prefix == "<|im_start|>" and pieces.default_system is None
    assert pieces.heads["user"] == "<|endoftext|>user<|im_end|>\n\n"
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert pieces.render(conversation) == render(custom, conversation, generation_prompt=True)


def test_template_of_another_shape_is_left_to_ollama(tokenizer):
    custom = with_template(tokenizer, INST_STYLE)
    assert chat_pieces(custom) is None
    text = modelfile(custom, "m.gguf", "runs/x")
    assert "TEMPLATE" not in text and "Ollama reads it from the GGUF" in text
