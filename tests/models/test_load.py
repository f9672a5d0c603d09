import pytest
import torch

from tunesmith.config.schema import ModelConfig
from tunesmith.errors import ModelLoadError
from tunesmith.models.load import EMBEDDED_GGUF, embedded_gguf_path, load_model, load_tokenizer, resolve_model_source


def test_hub_id_offline_names_hf_hub_offline_and_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_source(ModelConfig(name_or_path="some-org/some-model-that-is-not-cached"))
    message = str(caught.value)
    assert "HF_HUB_OFFLINE is set" in message
    for alternative in ("a local Hugging Face folder", "a GGUF file", "model.name_or_path: embedded"):
        assert alternative in message


def test_a_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="is neither a model folder nor a .gguf file"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_tiny_folder_loads_in_fp32_on_cpu(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert tokenizer.pad_token is not None and tokenizer.chat_template


@pytest.mark.slow
def test_gguf_file_loads_as_a_plain_model_equal_to_the_cached_conversion(embedded_dir):
    from_gguf = load_model(ModelConfig(name_or_path=str(embedded_gguf_path())))
    cached = load_model(ModelConfig(name_or_path=str(embedded_dir)))
    assert getattr(from_gguf.config, "quantization_config", None) is None  # so save_pretrained works
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, cached(ids).logits)
    assert embedded_gguf_path().name == EMBEDDED_GGUF


@pytest.mark.slow
def test_embedded_default_answers_and_stops_at_eos():
    from tunesmith.generate.sample import SamplingConfig, generate_reply
    from tunesmith.models.inference import load_for_inference

    model, tokenizer = load_for_inference("embedded")
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                           SamplingConfig(max_new_tokens=40))
    assert reply == "The capital of France is Paris."
