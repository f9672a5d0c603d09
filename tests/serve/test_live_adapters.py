"""Adapters that join and leave the serving engine while it decodes (``Engine.add_adapter``,
``Engine.remove_adapter``), and the app's per-request model access (``create_app(access=...)``), on the
tiny random Llama with random (non-zero) LoRA adapters that peft saved. What matters: the rows in
flight decode token for token as if nothing had changed; a loaded adapter decodes as peft's own
generate does with it; a refused folder leaves the engine as it was; a hidden model's 404 does not
tell that it exists.

Each test names the defect that was planted once to see it fail (then removed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi import Request
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.generate.sample import SamplingConfig, generate_ids
from tunesmith.serve.app import create_app
from tunesmith.serve.engine import Engine, SequentialEngine
from tunesmith.serve.live import model_not_found
from tunesmith.serve.served import Served

PROMPTS = ["Count to 4.", "Hello there, how are you doing on this fine day, my friend?", "1 2 3 4 5 6 7"]
LONG, SHORT = SamplingConfig(max_new_tokens=32), SamplingConfig(max_new_tokens=8)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def _save(model: PeftModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter folders as peft saves them: LoRA "one" and "two" and a DoRA of the tiny model; and ones
    that must be refused: a prompt-tuning adapter, LoRA adapters of a deeper (3 layers) and of a
    narrower (hidden 32) Llama, and an empty folder."""
    root = tmp_path_factory.mktemp("live-adapters")
    made = {}
    for name, seed, extra in (("one", 1, {}), ("two", 2, {}), ("dora", 3, {"use_dora": True})):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(**LORA, **extra))
        made[name] = _save(model, root / name)
    prompt = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    made["prompt"] = _save(prompt, root / "prompt")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    for name, change in (("deep", {"num_hidden_layers": 3}), ("narrow", {"hidden_size": 32})):
        other = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), **change}))
        made[name] = _save(get_peft_model(other, LoraConfig(**LORA)), root / name)
    (root / "empty").mkdir()
    made["empty"] = root / "empty"
    return made


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, tokenizer, folders, prompts) -> Callable[[str | None, int, SamplingConfig], list[int]]:
    """peft's own greedy tokens for (adapter folder name or None for the base, prompt index, sampling):
    a fresh tiny model, the adapter loaded by ``PeftModel.from_pretrained``, and ``generate``."""
    found: dict[tuple, list[int]] = {}

    def tokens(adapter: str | None, prompt: int, sampling: SamplingConfig) -> list[int]:
        key = (adapter, prompt, sampling.max_new_tokens)
        if key not in found:
            model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(folders[adapter]))
            generation = generate_ids(model.eval(), tokenizer, torch.tensor([prompts[prompt]]), sampling)
            found[key] = generation.token_ids
        return found[key]

    return tokens


def plain(tiny_model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


def with_one(tiny_model_dir: Path, folders: dict[str, Path]) -> PeftModel:
    """The tiny model with adapter "one" loaded by peft, as ``build_served`` serves a run's adapter."""
    return PeftModel.from_pretrained(plain(tiny_model_dir), str(folders["one"]), adapter_name="one").eval()


class Steps:
    """Watches a served model's decoding steps (one new token per row): each step's (batch size, whether
    ``change`` was asked for, whether it was made). The ``hold``-th step waits for ``go``, so that the
    test asks for a change while rows are in flight; the first step after the change was made waits
    for ``resume`` (set from the start unless the test wants to submit there)."""

    def __init__(self, hold: int, resume: bool = True):
        self.hold, self.reached, self.go = hold, threading.Event(), threading.Event()
        self.changed, self.resume = threading.Event(), threading.Event()
        if resume:
            self.resume.set()
        self.change: Future[None] | None = None
        self.seen: list[tuple[int, bool, bool]] = []

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] != 1:
            return  # a prefill
        made = self.change is not None and self.change.done()
        self.seen.append((kwargs["input_ids"].shape[0], self.change is not None, made))
        if len(self.seen) == self.hold:
            self.reached.set()
            assert self.go.wait(30), "the test never let the engine go on"
        if made and not self.changed.is_set():
            self.changed.set()
            assert self.resume.wait(30), "the test never resumed the engine"


@contextmanager
def watching(model: torch.nn.Module, steps: Steps) -> Iterator[Steps]:
    """``steps`` on the inner transformers model, which stays the same when peft wraps or unwraps it. On
    the way out, a step still held is let go (a failing test does not keep the engine waiting)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    handle = inner.register_forward_pre_hook(steps, with_kwargs=True)
    try:
        yield steps
    finally:
        steps.go.set()
        steps.resume.set()
        handle.remove()


@contextmanager
def held(engine: Engine) -> Iterator[None]:
    """Requests submitted inside the block start together, as one batch."""
    with engine._wakeup:
        yield


def test_an_adapter_added_mid_generation_leaves_the_rows_in_flight_alone(tiny_model_dir, tokenizer, folders,
                                                                        prompts, expected):
    """A base row and a row of adapter "one" decode; between two of their steps adapter "two" is loaded;
    a request for "two" then joins their batch. The two rows in flight give what they give without the
    add, and "two" gives peft's own tokens. Planted defects seen failing: the adapter added without its
    weights (``add_adapter`` in place of ``load_adapter``: "two" off peft's tokens), and the engine's
    mode not recomputed after the load (``submit`` refused "two")."""
    model = with_one(tiny_model_dir, folders)
    steps = Steps(hold=3, resume=False)
    with Engine(model, tokenizer) as engine, watching(model, steps):
        with held(engine):
            base = engine.submit(prompts[1], LONG)
            one = engine.submit(prompts[0], LONG, adapter="one")
        assert steps.reached.wait(30)
        steps.change = engine.add_adapter("two", folders["two"])
        steps.go.set()
        assert steps.changed.wait(30)
        two = engine.submit(prompts[2], SHORT, adapter="two")
        steps.resume.set()
        results = [handle.result(60)[0].token_ids for handle in (base, one, two)]
        assert steps.change.result(0) is None and engine.adapters == {"one", "two"} and engine.mixed
    assert (2, True, False) not in steps.seen, "the add waited for a step boundary it did not need"
    assert (2, False, False) in steps.seen and (2, True, True) in steps.seen, "not added between two steps"
    assert (3, True, True) in steps.seen, "the new adapter's row did not join the rows in flight"
    assert expected("two", 2, SHORT) != expected(None, 2, SHORT), "the adapter changes nothing: no proof"
    assert results == [expected(None, 1, LONG), expected("one", 0, LONG), expected("two", 2, SHORT)]


def test_the_first_adapter_wraps_a_plain_model_and_removing_the_last_unwraps_it(tiny_model_dir, tokenizer,
                                                                              folders, prompts, expected):
    """A plain model decodes a base row; mid-generation its first adapter wraps it in PeftModel, after
    which base rows pass peft's "__base__" per row; the base row is unchanged and the adapter serves
    peft's tokens. Removing that adapter gives the very same plain model back, still exact. Planted
    defect seen failing: the engine's adapter mode not recomputed after the wrap (no adapter names
    passed, so the base row decoded with the new, active, adapter)."""
    model = plain(tiny_model_dir)
    steps = Steps(hold=2)
    with Engine(model, tokenizer) as engine, watching(model, steps):
        base = engine.submit(prompts[1], LONG)
        assert steps.reached.wait(30)
        steps.change = engine.add_adapter("one", folders["one"])
        steps.go.set()
        steps.change.result(30)
        assert base.result(60)[0].token_ids == expected(None, 1, LONG)
        assert isinstance(engine.model, PeftModel) and engine.model.get_base_model() is model
        assert engine.adapters == {"one"} and engine.mixed
        assert engine.submit(prompts[0], SHORT, adapter="one").result(60)[0].token_ids == expected("one", 0, SHORT)
        engine.remove_adapter("one").result(30)
        assert engine.model is model and engine.adapters is None
        assert engine.submit(prompts[0], SHORT).result(60)[0].token_ids == expected(None, 0, SHORT)
    assert (1, True, True) in steps.seen, "the base row was not in flight when the adapter came"
    assert not any(isinstance(m, PeftModel) or "lora" in type(m).__module__ for m in model.modules())


def test_bad_adapter_folders_are_refused_and_the_engine_serves_on(tiny_model_dir, tokenizer, folders, prompts,
                                                                  expected):
    """Refused, each with a ValueError that says why, and the model left as it was: a folder without an
    adapter, a prompt-learning adapter, adapters of a deeper and of a narrower model (first on the
    plain model, which must not stay wrapped, then beside a loaded adapter, which must stay alone),
    and a name loaded already. The engine then serves the base and "one" exactly. Planted defects seen
    failing: no fit check (the deeper model's adapter loaded without a word), and no undoing of a
    failed wrap (the plain model kept LoRA layers and the base output changed)."""
    model = plain(tiny_model_dir)
    refusals = {"empty": "not a PEFT adapter folder", "prompt": "learns a prompt",
                "deep": "modules the model lacks", "narrow": "size mismatch"}
    with Engine(model, tokenizer) as engine:
        for name, reason in refusals.items():
            with pytest.raises(ValueError, match=reason):
                engine.add_adapter(name, folders[name]).result(30)
            assert engine.model is model and engine.adapters is None
        assert not any("lora" in type(m).__module__ for m in model.modules()), "a failed load left LoRA layers"
        assert engine.submit(prompts[0], SHORT).result(60)[0].token_ids == expected(None, 0, SHORT)
        engine.add_adapter("one", folders["one"]).result(30)
        for name, folder in (("deep", folders["deep"]), ("narrow", folders["narrow"]), ("one", folders["two"])):
            with pytest.raises(ValueError, match="modules the model lacks|size mismatch|loaded already"):
                engine.add_adapter(name, folder).result(30)
            assert engine.adapters == {"one"} and set(engine.model.peft_config) == {"one"}
        with pytest.raises(ValueError, match="is not loaded"):
            engine.remove_adapter("deep").result(30)
        assert engine.submit(prompts[0], SHORT).result(60)[0].token_ids == expected(None, 0, SHORT)
        assert engine.submit(prompts[0], SHORT, adapter="one").result(60)[0].token_ids == expected("one", 0, SHORT)


def test_removing_an_adapter_waits_for_its_rows_and_refuses_new_ones(tiny_model_dir, tokenizer, folders, prompts,
                                                                     expected):
    """Removal asked while a row of "one" decodes: requests for "one" are refused at once, the row in
    flight finishes exactly, and only then is the adapter unloaded. Planted defect seen failing: the
    removal made at once (the row in flight then decoded on the unwrapped base model)."""
    model = with_one(tiny_model_dir, folders)
    steps = Steps(hold=2)
    with Engine(model, tokenizer) as engine, watching(model, steps):
        one = engine.submit(prompts[0], LONG, adapter="one")
        assert steps.reached.wait(30)
        steps.change = engine.remove_adapter("one")
        with pytest.raises(ValueError, match="being removed"):
            engine.submit(prompts[1], SHORT, adapter="one")
        steps.go.set()
        assert one.result(60)[0].token_ids == expected("one", 0, LONG)
        steps.change.result(30)
        assert engine.adapters is None and isinstance(engine.model, LlamaForCausalLM)
    assert (1, True, False) in steps.seen and not any(made for _, _, made in steps.seen)


def test_an_adapter_peft_cannot_mix_waits_until_the_rows_share_one_adapter(tiny_model_dir, tokenizer, folders,
                                                                          prompts, expected):
    """A DoRA adapter turns a mixing engine into one adapter per batch. Asked for while a base row and a
    short row of "one" share the batch, it waits (no request joins meanwhile) until the "one" row has
    finished, then loads; every row is exact. Planted defect seen failing: the DoRA adapter loaded at
    once (the batch of two adapters then decoded with the first row's adapter for both)."""
    model = with_one(tiny_model_dir, folders)
    steps = Steps(hold=2)
    with Engine(model, tokenizer) as engine, watching(model, steps):
        with held(engine):
            base = engine.submit(prompts[1], LONG)
            one = engine.submit(prompts[0], SHORT, adapter="one")
        assert steps.reached.wait(30)
        steps.change = engine.add_adapter("dora", folders["dora"])
        steps.go.set()
        steps.change.result(30)
        assert not engine.mixed
        dora = engine.submit(prompts[2], SHORT, adapter="dora")
        results = [handle.result(60)[0].token_ids for handle in (base, one, dora)]
    assert results == [expected(None, 1, LONG), expected("one", 0, SHORT), expected("dora", 2, SHORT)]
    assert (2, True, False) in steps.seen and (1, True, True) in steps.seen
    assert (2, True, True) not in steps.seen, "loaded while two adapters shared the batch"


def test_the_sequential_engine_loads_adapters_between_requests(tiny_model_dir, tokenizer, folders, prompts,
                                                               expected):
    """The one-at-a-time engine takes the same calls, made between two requests: its first adapter wraps
    the plain model too. Planted defect seen failing: no changes made by its loop (the add never done)."""
    with SequentialEngine(plain(tiny_model_dir), tokenizer) as engine:
        engine.add_adapter("one", folders["one"]).result(30)
        assert engine.submit(prompts[0], SHORT, adapter="one").result(60)[0].token_ids == expected("one", 0, SHORT)
        assert engine.submit(prompts[0], SHORT).result(60)[0].token_ids == expected(None, 0, SHORT)


ALICE_MODEL, ALICE_OTHER = "ft:tiny:alice-suffix:abc.123", "ft:tiny:alice-suffix:def.456"


class OwnModels:
    """Fine-tuned models and their owners, as a server's job store holds them: each key sees the base and
    its own models (loaded when first asked for); a name no one owns is left to the app to answer."""

    def __init__(self, folders: dict[str, Path]):
        self.folders, self.owners = folders, {ALICE_MODEL: "alice", ALICE_OTHER: "alice"}
        self.app = None

    def listed(self, request: Request) -> list[str]:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return ["tiny", *(model for model, owner in self.owners.items() if owner == key)]

    async def prepare(self, request: Request, model: str) -> None:
        if model not in self.owners:
            return
        if model not in self.listed(request):
            raise model_not_found(model)
        await self.app.state.load_adapter(model, self.folders[model])


def test_the_app_shows_each_request_its_models_and_loads_one_on_demand(tiny_model_dir, tokenizer, folders,
                                                                       expected):
    """Through the app with an access object: /v1/models lists what it says per key; another key's model
    answers OpenAI's 404, in the words a model that exists for no one gets; alice's model is loaded in
    her first request for it and answers peft's tokens; two loads of one name at once load it once.
    Planted defects seen failing: the 404 of ``_check_fields`` kept listing the served models (bob
    then learnt alice's model's name), ``prepare`` not called (alice's model a 404), and no sharing of
    a load in progress (two adapters loaded)."""
    served = Served(plain(tiny_model_dir), tokenizer, "tiny", {}, default_max_tokens=8)
    access = OwnModels({ALICE_MODEL: folders["one"], ALICE_OTHER: folders["two"]})
    app = access.app = create_app(served, access=access)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}

    def complete(model: str, headers: dict[str, str]):
        return client.post("/v1/completions", headers=headers,
                           json={"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]] == ["tiny", ALICE_MODEL,
                                                                                           ALICE_OTHER]
        assert [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]] == ["tiny"]
        assert complete(ALICE_MODEL, bob).json() == model_not_found(ALICE_MODEL).body()
        assert served.adapters == {}, "a hidden model was loaded"
        mine = complete(ALICE_MODEL, alice)
        assert mine.status_code == 200, mine.json()
        assert mine.json()["choices"][0]["text"] == text(expected("one", 0, SHORT))
        assert complete("tiny", alice).json()["choices"][0]["text"] == text(expected(None, 0, SHORT))
        assert set(served.adapters) == {ALICE_MODEL} and isinstance(served.model, PeftModel)
        hidden, missing = complete(ALICE_MODEL, bob), complete("ft:tiny:nobody:zzz", bob)  # loaded, and no one's
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == model_not_found(ALICE_MODEL).body()
        assert missing.json() == model_not_found("ft:tiny:nobody:zzz").body()
        assert client.get("/health").json()["models"] == ["tiny"]

        engine, calls = app.state.engine, []
        add = engine.add_adapter
        engine.add_adapter = lambda name, folder: calls.append(name) or add(name, folder)

        async def load_twice() -> None:
            await asyncio.gather(*(app.state.load_adapter(ALICE_OTHER, folders["two"]) for _ in range(2)))

        client.portal.call(load_twice)
        assert len(calls) == 1 and served.adapters[ALICE_OTHER] == calls[0] and calls[0] in engine.adapters
        assert complete(ALICE_OTHER, alice).json()["choices"][0]["text"] == text(expected("two", 0, SHORT))
        client.portal.call(app.state.remove_adapter, ALICE_OTHER)
        assert set(served.adapters) == {ALICE_MODEL} and engine.adapters == {served.adapters[ALICE_MODEL]}
