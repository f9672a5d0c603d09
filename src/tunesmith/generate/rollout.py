"""Rollout engines: what samples the policy's completions during RL (``grpo.engine``).

- ``hf`` (default): transformers' ``generate`` on the training model itself, one left-padded batch with a
  KV cache, with the fast path's training kernels switched off for the call (``plain_forward``). Its
  randomness is the torch RNG the checkpoints save, so a resumed run samples what the uninterrupted
  one would have.
- ``vllm``: vLLM's server colocated as a child process (the one ``tunesmith serve --engine vllm`` runs,
  ``generate/vllm.py``), serving the base model with the policy's LoRA adapter. After every optimizer
  update the adapter is saved (safetensors) and loaded into vLLM through its runtime LoRA endpoint, under
  a new name, before the next sampling; the base weights never change, so LoRA is what it syncs (other
  methods are refused by the config). Each completion is a request with its own seed, drawn from the
  torch RNG: a resumed run sends the same seeds to the same weights. vLLM's batching decides the order
  of its floating-point sums (bfloat16 on CPU by default), so the completions are the same for the same
  batch of requests but are not guaranteed token for token across runs.

Both return token ids cut after the first stop token, which is kept (a policy learns to stop).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import httpx
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.generate import vllm
from tunesmith.generate.sample import SamplingConfig, sample_batch, stop_token_ids
from tunesmith.models.fastpath import plain_forward, unwrapped_parts

log = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    def sample(self, model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """One completion of each prompt (token ids, cut after the first stop token, which is kept)."""
        ...

    def close(self) -> None:
        ...


class HFRollouts:
    """``generate`` on the training model, with the plain forward (``plain_forward``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def sample(self, model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        with plain_forward(model):
            return sample_batch(model, self.tokenizer, prompts, sampling)

    def close(self) -> None:
        pass  # nothing outside this process to release


def fingerprint(parameters: list[torch.Tensor]) -> str:
    """A digest of the tensors' bytes: it changes with any change of any weight. Tensors' version counters
    would be cheaper but miss fused optimizer steps (``torch._fused_adamw_``, bitsandbytes' 8-bit kernels
    update in place without counting), which plain ``adamw`` uses on CUDA; hashing a LoRA adapter's few
    megabytes takes milliseconds."""
    digest = hashlib.blake2b(digest_size=16)
    for parameter in parameters:
        digest.update(parameter.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class VLLMRollouts:
    """vLLM's server beside the training process, sampling with the policy's current LoRA adapter.

    ``base_dir``: the base model's folder (what the policy's adapter sits on); ``rank``: the adapter's rank;
    ``log_path``: vLLM's output. Started on the first ``sample``; ``close`` stops it and removes the
    synced adapter folders."""

    NAME = "policy"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, base_dir: str, rank: int, context_length: int,
                 log_path: Path, python: str | None = None, extra: list[str] | None = None, max_batch_size: int = 256,
                 startup_timeout: float = 600.0):
        self.tokenizer, self.base_dir, self.rank = tokenizer, base_dir, rank
        self.context_length, self.log_path = context_length, log_path
        self.python, self.extra, self.max_batch_size = python, list(extra or []), max_batch_size
        self.startup_timeout = startup_timeout
        self.process: vllm.VLLMProcess | None = None
        self.client: httpx.Client | None = None
        self.folder: Path | None = None
        self.synced: str | None = None  # the fingerprint of the weights vLLM has
        self.syncs = 0
        self.name: str | None = None  # the adapter's name in vLLM now: a new one per sync

    def start(self, device: torch.device) -> None:
        cpu = device.type == "cpu"
        python = vllm.find_python(self.python)
        models = vllm.VLLMModels(self.base_dir, "base", self.base_dir, context_length=self.context_length)
        extra = list(self.extra)
        if device.type == "cuda" and not any(a.startswith("--gpu-memory-utilization") for a in extra):
            extra += ["--gpu-memory-utilization", "0.3"]  # beside the training process on the same GPU
        line = vllm.command(python, models, vllm.free_port(), self.max_batch_size, None,
                            ["--enable-lora", "--max-lora-rank", str(vllm.lora_rank(self.rank)), "--max-loras", "1",
                             *extra], cpu)
        env = vllm.environment(cpu)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # its /v1/load_lora_adapter, on the loopback port only
        # Not a member of the training job: torchrun's variables stay out, and the server uses this process's GPU.
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            env.pop(name, None)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        self.folder = Path(tempfile.mkdtemp(prefix="tunesmith-rollout-"))
        log.info("rollouts: starting vLLM (%s; log %s)", python, self.log_path)
        self.process = vllm.VLLMProcess(line, env, self.log_path, self.startup_timeout)
        self.process.start()
        self.client = httpx.Client(base_url=self.process.url, timeout=httpx.Timeout(600.0, connect=10.0))

    def sync(self, model: nn.Module) -> None:
        """Save the policy's adapter and load it into vLLM, when its weights changed since the last sync. Each
        sync is a new adapter name and folder, and the previous one is unloaded: vLLM keys its prefix cache
        on both, so no key or value computed with older weights is reused (and an in-place load would be
        read again at every step)."""
        peft_model = unwrapped_parts(model)[1]
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        current = fingerprint(trainable)
        if current == self.synced:
            return
        name, target = f"{self.NAME}-{self.syncs}", self.folder / f"adapter-{self.syncs}"
        peft_model.save_pretrained(target, safe_serialization=True)
        if self.name is not None:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.name})
            shutil.rmtree(self.folder / f"adapter-{self.syncs - 1}", ignore_errors=True)
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target)})
        self.name, self.synced, self.syncs = name, current, self.syncs + 1

    def _post(self, path: str, body: dict) -> None:
        response = self.client.post(path, json=body)
        if response.status_code != 200:
            raise vllm.VLLMError(f"vLLM refused {path} for the policy's adapter ({response.status_code}): "
                                 f"{response.text[:500]}")

    def sample(self, model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        if self.process is None:
            self.start(next(model.parameters()).device)
        self.sync(model)
        # The seeds come from the torch RNG the checkpoints save; one per completion, so the G copies of a prompt differ.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        stops = stop_token_ids(unwrapped_parts(model)[1], self.tokenizer)
        greedy = sampling.temperature <= 0
        bodies = [{"model": self.name, "prompt": prompt, "max_tokens": sampling.max_new_tokens,
                   "temperature": 0.0 if greedy else sampling.temperature, "top_p": 1.0 if greedy else sampling.top_p,
                   "seed": seed, "stop_token_ids": stops, "return_token_ids": True, "skip_special_tokens": False}
                  for prompt, seed in zip(prompts, seeds)]
        # All requests at once: vLLM batches what arrives together.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, len(bodies))) as pool:
            answers = list(pool.map(self._complete, bodies))
        return [self._ids(answer, stops) for answer in answers]

    def _complete(self, body: dict) -> dict:
        response = self.client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise vllm.VLLMError(f"vLLM could not sample ({response.status_code}): {response.text[:500]}")
        return response.json()["choices"][0]

    @staticmethod
    def _ids(choice: dict, stops: list[int]) -> list[int]:
        """The completion's token ids, cut after the first stop token (kept, as ``sample_batch`` keeps it)."""
        ids = list(choice.get("token_ids") or [])
        for i, token in enumerate(ids):
            if token in stops:
                return ids[:i + 1]
        if choice.get("finish_reason") == "stop" and isinstance(choice.get("stop_reason"), int):
            ids.append(choice["stop_reason"])  # a stop token vLLM left out of the ids
        return ids

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None:
            self.process.close()
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def rollout_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_dir: str,
                   context_length: int, log_path: Path, python: str | None = None,
                   extra: list[str] | None = None) -> RolloutEngine:
    """The engine ``name`` (hf | vllm) for ``model``; vllm needs a LoRA policy (the config checks it first)."""
    if name == "hf":
        return HFRollouts(tokenizer)
    peft_model = unwrapped_parts(model)[1]
    config = peft_model.peft_config[peft_model.active_adapter]
    return VLLMRollouts(tokenizer, base_dir, int(config.r), context_length, log_path, python, extra)
