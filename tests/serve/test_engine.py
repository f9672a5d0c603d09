"""The batching engine against generate_ids, on the tiny random Llama: what a batch decodes equals
what each request decodes alone, per row (adapter, stop strings, max tokens, cancel, seed), with
logprobs, threaded and asyncio readers, and dynamic batching where the cache cannot take joiners."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from tunesmith.generate.sample import SamplingConfig, generate_ids
from tunesmith.serve.engine import Engine
from tunesmith.serve.handle import EngineError, Handle

PROMPTS = ["Count to 4.", "Hello there, how are you doing on this fine day, my friend?", "x", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


class Gate:
    """Holds the engine's decoding steps: ``reached`` once one waits, until ``opened`` is set."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()


@contextmanager
def batch_sizes(model, gate: Gate | None = None):
    """The batch size of every forward the model runs inside the block; with ``gate``, each decoding
    step (one new token per row) waits for it to open: a test can act between two steps."""
    sizes: list[int] = []

    def record(_, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if gate is not None and kwargs["input_ids"].shape[1] == 1:
            gate.reached.set()
            assert gate.opened.wait(30), "the test never opened the gate"

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = inner.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


@contextmanager
def held(engine: Engine):
    """Requests submitted inside the block wait until it ends, then start as one batch."""
    with engine._wakeup:
        yield


def alone(model, tokenizer, prompt: list[int], sampling: SamplingConfig, stop: list[str] | None = None):
    return generate_ids(model, tokenizer, torch.tensor([prompt]), sampling, stop=stop)


def streamed(handle: Handle) -> str:
    return "".join(piece.text for piece in handle)


def test_batched_greedy_equals_each_request_alone(model, tokenizer, prompts):
    """Prompts of different lengths start as one left-padded batch, and one more joins while they
    decode; each result is token for token what generate_ids gives it alone, and the streamed
    pieces concatenate to the text. Planted defects seen failing: no position ids (left-padded rows
    then decode from the wrong positions), and the joining row's left padding left unmasked."""
    sampling = SamplingConfig(max_new_tokens=24)
    expected = [alone(model, tokenizer, p, sampling) for p in prompts]
    gate = Gate()
    with Engine(model, tokenizer) as engine:
        assert engine.submit(prompts[0], sampling).result(60)[0].token_ids == expected[0].token_ids  # alone
        with batch_sizes(model, gate) as sizes:
            with held(engine):
                handles = [engine.submit(p, sampling) for p in prompts[:3]]
            assert gate.reached.wait(30)  # the three decode, held at their first step ...
            handles.append(engine.submit(prompts[3], sampling))  # ... and the fourth joins them
            gate.opened.set()
            texts = [streamed(h) for h in handles]
            results = [h.result(60)[0] for h in handles]
    assert sizes[:4] == [3, 3, 1, 4], f"the requests were not batched as planned: {sizes}"
    for i, (want, got, text) in enumerate(zip(expected, results, texts, strict=True)):
        assert got.token_ids == want.token_ids, f"prompt {i}"
        assert got.text == want.text == text
        assert got.finish_reason == want.finish_reason == "length"


def test_without_a_joinable_cache_a_request_waits_for_the_next_batch(model, tokenizer, prompts, monkeypatch):
    """Dynamic batching, for caches whose rows cannot be padded and sliced (a sliding window): a
    request that comes while a batch decodes starts once that batch has ended, and is still exact."""
    import tunesmith.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "_joinable", lambda cache: False)
    sampling = SamplingConfig(max_new_tokens=8)
    expected = [alone(model, tokenizer, p, sampling).token_ids for p in prompts]
    gate = Gate()
    with Engine(model, tokenizer) as engine, batch_sizes(model, gate) as sizes:
        with held(engine):
            handles = [engine.submit(p, sampling) for p in prompts[:3]]
        assert gate.reached.wait(30)
        handles.append(engine.submit(prompts[3], sampling))
        gate.opened.set()
        assert [h.result(60)[0].token_ids for h in handles] == expected
    assert sizes == [3] * 8 + [1] * 8  # each batch: a prefill and 7 decoding steps


def test_asyncio_readers_stream_and_wait_without_threads(model, tokenizer, prompts):
    """Eight requests read on one event loop, half streamed (``async for``) and half awaited, decode
    as one batch and give generate_ids' texts; the streamed pieces concatenate to the text. Planted
    defect seen failing (timeout): the engine's thread not waking the event loop."""
    sampling = SamplingConfig(max_new_tokens=12)
    expected = [alone(model, tokenizer, p, sampling).text for p in prompts] * 2

    async def read(handle: Handle, streamed: bool) -> str:
        if not streamed:
            return (await handle.wait())[0].text
        text = "".join([piece.text async for piece in handle.stream()])
        assert text == (await handle.wait())[0].text  # the pieces were read: wait() returns at once
        return text

    async def read_all(handles: list[Handle]) -> list[str]:
        readers = asyncio.gather(*(read(h, i % 2 == 0) for i, h in enumerate(handles)))
        return list(await asyncio.wait_for(readers, 60))

    with Engine(model, tokenizer) as engine, batch_sizes(model) as sizes:
        with held(engine):
            handles = [engine.submit(p, sampling) for p in prompts * 2]
        assert asyncio.run(read_all(handles)) == expected
    assert sizes[0] == 8


@pytest.fixture(scope="module")
def with_adapters(tiny_model_dir):
    """The tiny model with two random (non-zero) LoRA adapters, "one" and "two"."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, lora, adapter_name="one")
    peft_model.add_adapter("two", lora)
    return peft_model.eval()


def test_two_adapters_and_the_base_in_one_batch(with_adapters, tokenizer, prompts):
    """Rows for adapter one, adapter two and the base share each forward (peft's per-row
    adapter_names) and each equals its sequential result. Planted defect seen failing: every row
    given the first row's adapter."""
    model, sampling = with_adapters, SamplingConfig(max_new_tokens=16)
    expected = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        expected[name] = [alone(model, tokenizer, p, sampling).token_ids for p in prompts[:2]]
    with model.disable_adapter():
        expected[None] = [alone(model, tokenizer, p, sampling).token_ids for p in prompts[:2]]
    assert len({tuple(ids[0]) for ids in expected.values()}) == 3, "the adapters change nothing: no proof"
    model.set_adapter("one")  # the active adapter must not matter to the engine
    with Engine(model, tokenizer) as engine, batch_sizes(model) as sizes:
        with held(engine):
            handles = {(name, i): engine.submit(p, sampling, adapter=name)
                       for name in ("two", None, "one") for i, p in enumerate(prompts[:2])}
        results = {key: h.result(60)[0].token_ids for key, h in handles.items()}
        with pytest.raises(ValueError, match="'three' is not loaded"):
            engine.submit(prompts[0], sampling, adapter="three")
        with pytest.raises(ValueError, match="vocabulary has ids 0 to"):
            engine.submit([10**7], sampling)
    assert sizes[0] == 6
    for (name, i), ids in results.items():
        assert ids == expected[name][i], f"adapter {name}, prompt {i}"


def test_stop_strings_and_max_tokens_per_row(model, tokenizer, prompts):
    """In one batch: a row cut at its stop string (text without it, as generate_ids), a row with a
    smaller max_tokens, a row with neither; streamed pieces never show the stop string. Planted
    defect seen failing: the stop string kept in the text."""
    long = SamplingConfig(max_new_tokens=20)
    full = alone(model, tokenizer, prompts[1], long)
    stop = full.text[6:9]
    assert stop and full.text.find(stop) > 0
    expected = [alone(model, tokenizer, prompts[1], long, [stop, "never"]),
                alone(model, tokenizer, prompts[0], SamplingConfig(max_new_tokens=3)), full]
    assert expected[0].text == full.text[:full.text.find(stop)] and expected[0].finish_reason == "stop"
    with Engine(model, tokenizer) as engine:
        with held(engine):
            handles = [engine.submit(prompts[1], long, stop=[stop, "never"]),
                       engine.submit(prompts[0], SamplingConfig(max_new_tokens=3)),
                       engine.submit(prompts[1], long)]
        texts = [streamed(h) for h in handles]
        results = [h.result(60)[0] for h in handles]
        assert streamed(handles[0]) == "", "a second reading ends at once"
    for want, got, text in zip(expected, results, texts, strict=True):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert text == got.text
    assert len(results[1].token_ids) == 3 and results[1].finish_reason == "length"


def test_cancelling_one_request_leaves_the_others_alone(model, tokenizer, prompts):
    """One of three rows is cancelled mid-way: it ends early as "cancelled", the others are exact.
    Planted defect seen failing: when the cancelled row leaves, the first rows of the cache kept
    instead of the rows that go on."""
    sampling = SamplingConfig(max_new_tokens=200)
    expected = [alone(model, tokenizer, p, sampling).token_ids for p in prompts[:3]]
    cancel, gate = threading.Event(), Gate()
    with Engine(model, tokenizer) as engine, batch_sizes(model, gate) as sizes:
        with held(engine):
            handles = [engine.submit(prompts[0], sampling), engine.submit(prompts[1], sampling, cancel=cancel),
                       engine.submit(prompts[2], sampling)]
        assert gate.reached.wait(30)  # each row has its first token; the first decoding step waits
        cancel.set()
        gate.opened.set()
        results = [h.result(60)[0] for h in handles]
    assert results[1].finish_reason == "cancelled" and len(results[1].token_ids) == 1
    assert sizes[:3] == [3, 3, 2]
    assert results[1].token_ids == expected[1][:len(results[1].token_ids)]
    assert [results[0].token_ids, results[2].token_ids] == [expected[0], expected[2]]


def test_a_seeded_sampled_request_is_reproducible(model, tokenizer, prompts):
    """The same seed gives the same tokens alone and inside a batch of other sampled requests (each
    row draws from its own generator); another seed gives others, and n completions use seed, seed+1.
    Planted defect seen failing: rows drawing from torch's global generator."""
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    with Engine(model, tokenizer) as engine:
        first = engine.submit(prompts[0], sampling).result(60)[0].token_ids
        with held(engine):
            others = [engine.submit(p, SamplingConfig(16, 0.7, 1.0, seed=i)) for i, p in enumerate(prompts)]
            again = engine.submit(prompts[0], sampling)
            pair = engine.submit(prompts[0], SamplingConfig(16, 1.0, 0.9, seed=6), n=2)
        assert again.result(60)[0].token_ids == first
        assert [c.token_ids for c in pair.result(60)][1] == first
        assert engine.submit(prompts[0], SamplingConfig(16, 1.0, 0.9, seed=8)).result(60)[0].token_ids != first
        greedy = engine.submit(prompts[0], SamplingConfig(16)).result(60)[0].token_ids
        assert all(h.result(60) for h in others)
    assert first != greedy, "sampling gave the greedy tokens: the test would prove little"


def test_logprobs_are_the_log_softmax_of_the_chosen_tokens(model, tokenizer, prompts):
    """Each token's logprob is the log-softmax of a full (uncached) forward at its position, and the
    top k are sorted, most likely first (greedy: the chosen token is the first). Planted defect seen
    failing: logprobs taken after a temperature of 0.5."""
    with Engine(model, tokenizer) as engine:
        with held(engine):
            handles = [engine.submit(prompts[1], SamplingConfig(8), top_logprobs=3),
                       engine.submit(prompts[2], SamplingConfig(8, 1.0, seed=3), top_logprobs=0),
                       engine.submit(prompts[0], SamplingConfig(8))]
        results = [h.result(60)[0] for h in handles]
    assert results[2].logprobs is None
    for prompt, result, k in ((prompts[1], results[0], 3), (prompts[2], results[1], 0)):
        sequence = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logits = model(sequence).logits[0, len(prompt) - 1:-1].float()  # (new, vocab)
        reference = logits.log_softmax(-1)
        assert [lp.token_id for lp in result.logprobs] == result.token_ids
        for step, lp in enumerate(result.logprobs):
            assert lp.logprob == pytest.approx(float(reference[step, lp.token_id]), abs=1e-4)
            assert len(lp.top) == k
            assert [value for _, value in lp.top] == sorted((value for _, value in lp.top), reverse=True)
            if k:
                assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
                assert lp.top[1][1] == pytest.approx(float(reference[step].topk(2).values[1]), abs=1e-4)


class ForceToken:
    """A row processor that allows one token only; records the tokens it was shown."""

    def __init__(self, token: int):
        self.token, self.seen = token, []

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(list(tokens))
        forced = torch.full_like(logits, float("-inf"))
        forced[self.token] = 0.0
        return forced


def test_row_processors_change_their_own_row_and_a_failing_one_fails_its_request_only(model, tokenizer, prompts):
    """In one batch: a row whose processor forces one token gets only that token, and its logprobs
    are still the model's own; a row whose processor raises fails its request alone; a row without
    processors equals its result alone. Planted defect seen failing: the first row's processors
    applied to every row."""
    sampling = SamplingConfig(max_new_tokens=6)
    expected = alone(model, tokenizer, prompts[0], sampling)
    forced_token = tokenizer.convert_tokens_to_ids("a")
    made: list[ForceToken] = []

    def force() -> list:
        made.append(ForceToken(forced_token))
        return [made[-1]]

    def broken(tokens, logits):
        raise RuntimeError("a processor that fails")

    with Engine(model, tokenizer) as engine:
        with held(engine):
            handles = [engine.submit(prompts[1], sampling, processors=force, n=2, top_logprobs=1),
                       engine.submit(prompts[2], sampling, processors=lambda: [broken]),
                       engine.submit(prompts[0], sampling)]
        forced = handles[0].result(60)
        with pytest.raises(EngineError, match="a processor that fails"):
            handles[1].result(60)
        plain = handles[2].result(60)[0]
    assert [c.token_ids for c in forced] == [[forced_token] * 6] * 2
    assert len(made) == 2 and made[0] is not made[1], "each completion gets its own processors"
    assert made[0].seen == [[forced_token] * k for k in range(6)]
    assert all(lp.logprob < 0 and lp.top[0][0] != forced_token for lp in forced[0].logprobs[:1])
    assert (plain.token_ids, plain.text) == (expected.token_ids, expected.text)


def test_a_request_whose_prefill_fails_fails_alone(model, tokenizer, prompts, monkeypatch):
    """Three requests join a batch together and the prefill of one of them fails: that request fails,
    the other two are prefilled on their own and are exact. Planted defect seen failing: the whole
    joining group failed."""
    sampling = SamplingConfig(max_new_tokens=6)
    expected = [alone(model, tokenizer, p, sampling).token_ids for p in prompts[:2]]
    poison = prompts[3]
    real_forward = Engine._forward

    def forward(self, rows, input_ids, mask, cache):
        if any(row.request.prompt == poison for row in rows):
            raise RuntimeError("this prompt breaks the forward")
        return real_forward(self, rows, input_ids, mask, cache)

    monkeypatch.setattr(Engine, "_forward", forward)
    with Engine(model, tokenizer) as engine:
        with held(engine):
            handles = [engine.submit(prompts[0], sampling), engine.submit(poison, sampling),
                       engine.submit(prompts[1], sampling)]
        with pytest.raises(EngineError, match="breaks the forward"):
            handles[1].result(60)
        assert [handles[0].result(60)[0].token_ids, handles[2].result(60)[0].token_ids] == expected


def test_dora_adapters_decode_one_adapter_per_batch(tiny_model_dir, tokenizer, prompts):
    """peft cannot mix DoRA adapters per row, so the engine runs one adapter per batch: requests for
    "one", the base and "one" again, queued together, decode as two batches in arrival order with
    the right adapter each, exact against each alone. Planted defect seen failing: the base request
    decoded with the adapter still active."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True)
    torch.manual_seed(2)
    model = get_peft_model(base, dora, adapter_name="one").eval()
    sampling = SamplingConfig(max_new_tokens=8)
    want_one = [alone(model, tokenizer, p, sampling).token_ids for p in prompts[:2]]
    with model.disable_adapter():
        want_base = alone(model, tokenizer, prompts[2], sampling).token_ids
        assert want_one[0] != alone(model, tokenizer, prompts[0], sampling).token_ids, "the adapter changes nothing"
    with Engine(model, tokenizer) as engine, batch_sizes(model) as sizes:
        assert not engine.mixed
        with held(engine):
            handles = [engine.submit(prompts[0], sampling, adapter="one"), engine.submit(prompts[2], sampling),
                       engine.submit(prompts[1], sampling, adapter="one")]
        results = [h.result(60)[0].token_ids for h in handles]
    assert results == [want_one[0], want_base, want_one[1]]
    assert sizes[0] == 1, "the base request waits: the second 'one' request may not jump the queue"


def test_prefix_tuning_is_served_one_completion_at_a_time(tiny_model_dir, tokenizer, prompts):
    """A prompt-learning adapter puts its prefix in front of the cache itself, which the batching
    engine cannot hold: engine_for gives the sequential engine, whose results and streamed pieces
    are generate_ids' (with processors, stop strings and n)."""
    from peft import PrefixTuningConfig

    from tunesmith.serve.engine import SequentialEngine, engine_for

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    sampling = SamplingConfig(max_new_tokens=10)
    expected = alone(model, tokenizer, prompts[1], sampling)
    with pytest.raises(ValueError, match="prompt-learning"):
        Engine(model, tokenizer)
    engine = engine_for(model, tokenizer)
    try:
        assert isinstance(engine, SequentialEngine)
        handle = engine.submit(prompts[1], sampling, n=2, top_logprobs=2)
        pieces = list(handle)
        results = handle.result(60)
        forced_token = tokenizer.convert_tokens_to_ids("a")
        forced = engine.submit(prompts[0], SamplingConfig(3), processors=lambda: [ForceToken(forced_token)])
        assert forced.result(60)[0].token_ids == [forced_token] * 3
    finally:
        engine.close()
    for index, result in enumerate(results):
        assert (result.token_ids, result.text) == (expected.token_ids, expected.text)
        assert "".join(p.text for p in pieces if p.index == index) == result.text
        assert len(result.logprobs) == len(result.token_ids)
    assert [p.finished is not None for p in pieces].count(True) == 2


def test_a_shared_prefix_is_prefilled_once(model, tokenizer):
    """Prompts that begin with the same 40 tokens (a system prompt, a preamble): the first is prefilled
    whole; the next two, joining together with rests of different lengths, go through the model only
    from the cached 40 tokens (five blocks of 8) on, and all three are exact against generate_ids.
    Planted defect seen failing: the cached prefix masked out as if it were padding (the rest
    then sees none of it and decodes from position 0)."""
    preamble = tokenizer("You are a careful assistant. Answer in one short sentence, and never more than "
                         "that, whatever the question, even when asked to go on at length about it. Keep it polite, "
                         "plain and true.")["input_ids"]
    assert len(preamble) >= 40
    prompts = [preamble[:40] + tokenizer(text)["input_ids"] for text in ("Count to 4.", "x", "1 2 3 4 5 6 7")]
    sampling = SamplingConfig(max_new_tokens=8)
    expected = [alone(model, tokenizer, p, sampling).token_ids for p in prompts]
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        with Engine(model, tokenizer) as engine:
            first = engine.submit(prompts[0], sampling).result(60)[0].token_ids
            with held(engine):
                handles = [engine.submit(p, sampling) for p in prompts[1:]]
            results = [first, *(h.result(60)[0].token_ids for h in handles)]
            hits = (engine.prefixes.hits, engine.prefixes.hit_tokens)
    finally:
        hook.remove()
    assert results == expected
    prefills = [shape for shape in widths if shape[1] > 1]
    assert prefills == [(1, len(prompts[0])), (2, max(len(p) for p in prompts[1:]) - 40)]
    assert hits == (2, 80)


def test_the_prefix_cache_evicts_the_least_recently_used_and_keeps_adapters_apart():
    from tunesmith.serve.prefix import PrefixCache

    def layers(length: int, value: float) -> list:
        return [(torch.full((2, length, 4), value), torch.full((2, length, 4), -value))]

    entry_bytes = 2 * 2 * 32 * 4 * 4  # keys and values, 2 heads x 32 tokens x 4 dims, float32
    cache = PrefixCache(capacity_bytes=2 * entry_bytes, block=16)
    prompts = [[k] * 40 for k in range(3)]  # 40 tokens: two whole blocks are kept
    cache.add(None, prompts[0], layers(40, 0.0))
    cache.add(None, prompts[1], layers(40, 1.0))
    assert cache.match(None, prompts[0] + [9])[0] == 32  # prompt 0 is now the most recently used
    assert cache.match("an-adapter", prompts[0])[0] == 0  # another adapter: other keys and values
    cache.add(None, prompts[2], layers(40, 2.0))  # evicts prompt 1, the least recently used
    assert cache.match(None, prompts[1])[0] == 0
    length, found = cache.match(None, prompts[2][:20] + [5] * 30)  # only the first block is shared
    assert length == 16 and found[0][0].shape == (2, 16, 4) and float(found[0][1][0, 0, 0]) == -2.0
    assert cache.nbytes == 2 * entry_bytes and len(cache.entries) == 2
    cache.add(None, [7] * 12, layers(12, 3.0))  # shorter than a block after keeping one token: nothing kept
    assert len(cache.entries) == 2


def test_a_sliding_window_model_lets_short_rows_leave_its_batch(tokenizer, prompts):
    """A sliding-window cache (Mistral's, window 8) keeps only its last tokens, so rows cannot join a
    running batch, and a row that finishes first must leave without the columns being trimmed: the
    longest prompt stops after 2 tokens, the others decode 20, all exact against generate_ids. Planted
    defect seen failing: the columns trimmed as for a plain cache (the others failed with a shape error)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=8, tie_word_embeddings=True, initializer_range=0.3,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    chosen = [prompts[1], prompts[2], prompts[3]]
    samplings = [SamplingConfig(max_new_tokens=k) for k in (2, 20, 20)]
    expected = [alone(model, tokenizer, p, s).token_ids for p, s in zip(chosen, samplings)]
    with Engine(model, tokenizer) as engine:
        assert not engine.plain_cache and engine.prefixes is None
        with held(engine):
            handles = [engine.submit(p, s) for p, s in zip(chosen, samplings)]
        assert [h.result(60)[0].token_ids for h in handles] == expected
