"""DPO and GRPO speed and memory: tunesmith against TRL's DPOTrainer and GRPOTrainer on the same
model, data and settings, the ratio printed in the same run.

    pip install -e '.[bench]'          # TRL, a benchmark-only extra
    python bench/align_vs_trl.py [--task dpo|grpo|both] [--warmup 2] [--steps 6]
    python bench/align_vs_trl.py --task grpo --grpo-loss dapo [--updates-per-batch 2]

Both sides train the embedded SmolLM2-135M (float32 on CPU) with LoRA r 16, alpha 32, dropout 0 on
every linear layer, AdamW at the same learning rate (decaying linearly to 0 over the run, no warmup:
TRL's default, where tunesmith's is cosine), no gradient checkpointing (TRL turns it on by
default; ``--gradient-checkpointing`` turns it on for both), no experiment tracker (tunesmith's MLflow
default off, TRL's ``report_to: none``) and the same rows:

- DPO: the first valid Anthropic HH pairs of ../shared/data (the prompt as chat messages, the two
  replies), ``--batch`` pairs a step, at most ``--max-seq-len`` tokens (both cut the prompt's start),
  β 0.1, the reference being the model with its adapters off.
- GRPO: GSM8K questions, ``--prompts`` a step with ``--group`` completions each of at most
  ``--max-new-tokens`` tokens sampled at temperature 1 (top-p 1, no top-k), rewarded by
  tunesmith.rewards' gsm8k_exact and gsm8k_format (the same functions on both sides), the same
  prompts at the same step (TRL gets them in tunesmith's seeded order, unshuffled), one micro-batch a
  step (no gradient accumulation). Sampling draws differ between the two, so completions and rewards
  differ: the mean completion length and mean reward are printed beside the speed, and the reward of
  each sampled batch below it.

``--grpo-loss`` picks the GRPO-family variant; both sides get its settings as tunesmith's config
defaults them (its paper's values; ``--beta``, ``--epsilon``, ``--epsilon-high`` override them on
both) and ``--updates-per-batch`` policy updates per sampled batch (tunesmith's
``grpo.updates_per_batch``, TRL's ``num_iterations``; with 1 the ratio π/π_old is 1 and no clip binds):

- ``grpo``: β 0.04, ε 0.2/0.2, advantages (r − mean)/(std + 1e-4) within the group, each
  completion's token losses averaged, then the completions (TRL ``loss_type: grpo``).
- ``dr_grpo``: β 0.04, ε 0.2/0.2, advantages r − mean (TRL ``scale_rewards: none``), each
  completion's token losses summed and divided by ``--max-new-tokens`` (TRL ``loss_type: dr_grpo``).
- ``dapo``: β 0 (no reference), ε 0.2/0.28 (clip-higher), token-level: every completion token of
  the step weighs the same (TRL ``loss_type: dapo``, which divides by the tokens of the whole
  accumulated generation batch, tunesmith by the micro-batch's: the same here, one micro-batch a
  step). Only the common subset: tunesmith's dynamic sampling (dapo's default) is off, TRL's
  GRPOTrainer has none; DAPO's over-long shaping is off on both (tunesmith's ``overlong_buffer``,
  TRL's only as a reward function) and so is TRL's ``mask_truncated_completions``, which tunesmith
  does not have.
- ``gspo``: β 0, ε 3e-4/4e-4, one ratio per completion, the geometric mean of its token ratios
  (TRL ``importance_sampling_level: sequence`` with ``loss_type: grpo``). Only meaningful with
  ``--updates-per-batch`` above 1.

For every variant TRL's ``use_bias_correction_kl`` (on by default: the KL term times the ratio, which
changes its gradient even on-policy) is off, as tunesmith's KL is the plain k3 estimate. What stays
different: with more than one update per batch TRL computes the sampling policy's log-probabilities
in an extra no-grad forward after sampling, where tunesmith keeps those of the first update's forward
(the same values); TRL computes each token's entropy in every training forward (for its logs).
tunesmith's rloo and reinforce_pp have no GRPOTrainer counterpart and are not offered.

Each side runs in its own forked child: steps/s is timed from the end of step ``--warmup`` to the
end of the last step, and the peak memory is the child's peak RSS (CUDA: max allocated), which
includes loading the model and preparing the data, and what the parent held when it forked (torch,
transformers and tunesmith imported: the parent's peak is printed; the same for both sides). The
mean completion length and reward are over the timed steps' sampled batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forked import run_forked  # noqa: E402  (bench/ is on sys.path when a script there runs)

from tunesmith.config.load import build_config  # noqa: E402
from tunesmith.config.schema import DatasetConfig, GRPOConfig  # noqa: E402
from tunesmith.data.build import DataReport, read_canonical  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh_rlhf_harmless_sample.jsonl.gz"
GSM8K = SHARED / "gsm8k_train.jsonl"
REWARDS = ["tunesmith.rewards:gsm8k_exact", "tunesmith.rewards:gsm8k_format"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SEED = 0

# The GRPO-family variants TRL's GRPOTrainer runs as tunesmith does: what it is told for each (the clip
# range, β and updates per batch come from grpo_settings, the same on both sides), and in words.
TRL_VARIANTS = {
    "grpo": ({"loss_type": "grpo", "scale_rewards": "group", "importance_sampling_level": "token"},
             "advantages (r - mean)/(std + 1e-4) per group; each completion's token losses averaged"),
    "dr_grpo": ({"loss_type": "dr_grpo", "scale_rewards": "none", "importance_sampling_level": "token"},
                "advantages r - mean; each completion's token losses summed / max_new_tokens"),
    "dapo": ({"loss_type": "dapo", "scale_rewards": "group", "importance_sampling_level": "token"},
             "advantages (r - mean)/(std + 1e-4) per group; token-level (every token of the step weighs the same)"),
    "gspo": ({"loss_type": "grpo", "scale_rewards": "group", "importance_sampling_level": "sequence"},
             "advantages (r - mean)/(std + 1e-4) per group; one ratio per completion (geometric mean)"),
}
# The common subset: what one side has and the other not, turned off on both (printed with the results).
COMMON_SUBSET = {
    "all": "off on both: TRL's use_bias_correction_kl (tunesmith's KL is plain k3) and mask_truncated_completions",
    "dapo": "off on both: tunesmith's dynamic sampling (TRL has none) and over-long reward shaping",
}


def steps_per_s(ends: list[float], warmup: int) -> float:
    """Steps per second from the end of step ``warmup`` (1-based) to the end of the last step."""
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def max_seq_len(args: argparse.Namespace, task: str) -> int:
    return args.max_seq_len if task == "dpo" else 512


def cuda_peak() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def grpo_settings(args: argparse.Namespace) -> dict:
    """The variant's settings as tunesmith's config defaults them, with the command line's overrides, all
    written out so that both sides get the same (tunesmith drops dapo's epsilon_high default when epsilon
    is given; here both are given)."""
    given = {"beta": args.beta, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high}
    config = GRPOConfig.model_validate({"loss": args.grpo_loss, **{k: v for k, v in given.items() if v is not None}})
    return {"loss": config.loss, "beta": config.beta, "epsilon": config.epsilon, "epsilon_high": config.clip_high,
            "updates_per_batch": args.updates_per_batch}


def task_label(args: argparse.Namespace, task: str) -> str:
    return f"grpo/{args.grpo_loss}" if task == "grpo" else task


def timed_means(points: dict[str, list[tuple[int, float]]], warmup: int) -> dict:
    """The mean of each series over the timed steps (those after ``warmup``)."""
    means = {}
    for key, series in points.items():
        timed = [value for step, value in series if step > warmup]
        if timed:
            means[key] = sum(timed) / len(timed)
    return means


# ---------------------------------------------------------------- tunesmith


def tunesmith_run(args: argparse.Namespace, task: str, data: Path, out: Path) -> dict:
    from tunesmith.recipes.dpo import run_dpo
    from tunesmith.recipes.grpo import run_grpo
    if task == "dpo":
        section = {"preference": {"loss": "dpo", "beta": 0.1}}
    else:
        settings = grpo_settings(args)
        section = {"grpo": {"rewards": REWARDS, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
                            "temperature": 1.0, "top_p": 1.0, "loss": settings["loss"], "beta": settings["beta"],
                            "epsilon": settings["epsilon"], "epsilon_high": settings["epsilon_high"],
                            "updates_per_batch": settings["updates_per_batch"],
                            "dynamic_sampling": False, "overlong_buffer": 0}}
    config = build_config({
        "name": f"{task}-vs-trl", "task": task,
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": max_seq_len(args, task)},
        "method": {"type": "lora", "lora": LORA},
        "training": {"lr": args.lr, "scheduler": "linear", "warmup_steps": 0, "max_steps": args.warmup + args.steps,
                     "seed": SEED,
                     "batch_size": args.batch if task == "dpo" else args.prompts, "grad_accum": 1,
                     "gradient_checkpointing": args.gradient_checkpointing, "log_every": 1, "save_every": None},
        "tracking": {"backends": []},  # metrics.jsonl only, as TRL's report_to none (no MLflow in the peak)
        "output": {"dir": str(out)}, **section,
    })
    run = (run_dpo if task == "dpo" else run_grpo)(config, overwrite=True)
    steps = [row for row in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    result = {"steps_per_s": steps_per_s([row["elapsed_s"] for row in steps], args.warmup)}
    if task == "grpo":
        # completion_tokens at every update, reward only where a batch was sampled (not at its repeats)
        points = {key: [(row["step"], row[key]) for row in steps if key in row]
                  for key in ("completion_tokens", "reward")}
        result |= timed_means(points, args.warmup)
        result["rewards"] = points["reward"]
    return {**result, **cuda_peak()}


# ---------------------------------------------------------------- TRL


def trl_run(args: argparse.Namespace, task: str, rows: list[dict], out: Path) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tunesmith.models.load import prepare_embedded
    from tunesmith.rewards import load_reward
    from tunesmith.train.loop import epoch_order

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logs: list[tuple[int, dict]] = []

        def on_step_end(self, _args, _state, _control, **_kwargs) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, _args, state, _control, logs=None, **_kwargs) -> None:
            self.logs.append((state.global_step, dict(logs or {})))

    folder = prepare_embedded()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common = {"output_dir": str(out), "learning_rate": args.lr, "lr_scheduler_type": "linear", "warmup_steps": 0,
              "max_steps": args.warmup + args.steps, "seed": SEED,
              "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False,
              "use_cpu": not torch.cuda.is_available(), "gradient_checkpointing": args.gradient_checkpointing,
              "dataloader_num_workers": 0, "gradient_accumulation_steps": 1}
    clock = Clock()
    if task == "dpo":
        dataset = datasets.Dataset.from_list([
            {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        config = trl.DPOConfig(per_device_train_batch_size=args.batch, max_length=max_seq_len(args, task),
                               truncation_mode="keep_end", beta=0.1, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[clock])
    else:
        def for_trl(name: str):
            """TRL hands rewards the dataset's columns as keywords and chat completions as messages."""
            function = load_reward(name)

            def reward(prompts, completions, answer, **_kwargs):
                texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
                return function(prompts, texts, answer)
            reward.__name__ = name.rsplit(":", 1)[-1]
            return reward

        # tunesmith's first epoch order, unshuffled: TRL's step k samples the prompts tunesmith's step k does.
        dataset = datasets.Dataset.from_list([
            {"prompt": rows[i]["messages"][:-1], "answer": rows[i]["messages"][-1]["content"]}
            for i in epoch_order(len(rows), SEED, 0)])
        settings = grpo_settings(args)
        variant, _ = TRL_VARIANTS[settings["loss"]]
        config = trl.GRPOConfig(per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                                max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                beta=settings["beta"], epsilon=settings["epsilon"],
                                epsilon_high=settings["epsilon_high"], num_iterations=settings["updates_per_batch"],
                                use_bias_correction_kl=False, mask_truncated_completions=False,
                                shuffle_dataset=False, **variant, **common)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[for_trl(name) for name in REWARDS], args=config,
                                  train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                                  callbacks=[clock])
    trainer.train()
    result = {"steps_per_s": steps_per_s(clock.ends, args.warmup), "trl": trl.__version__}
    if task == "grpo":
        # both logged only at the steps that sampled a batch (TRL's repeats log neither)
        points = {ours: [(step, log[theirs]) for step, log in clock.logs if log.get(theirs) is not None]
                  for ours, theirs in (("completion_tokens", "completions/mean_length"), ("reward", "reward"))}
        result |= timed_means(points, args.warmup)
        result["rewards"] = points["reward"]
    return {**result, **cuda_peak()}


# ---------------------------------------------------------------- driver


def task_rows(args: argparse.Namespace, task: str) -> list[dict]:
    """The canonical rows both sides train on: exactly enough for the steps, in file order (a GRPO batch
    is sampled once for ``--updates-per-batch`` steps)."""
    source = HH if task == "dpo" else GSM8K
    if not source.is_file():
        raise SystemExit(f"{source} not found (../shared/data)")
    steps = args.warmup + args.steps
    needed = steps * args.batch if task == "dpo" else steps // args.updates_per_batch * args.prompts
    rows = []
    for row in read_canonical(DatasetConfig(path=str(source)), DataReport()):
        rows.append(row.row)
        if len(rows) == needed:
            return rows
    raise SystemExit(f"{source} has fewer than {needed} valid rows")


def compare(args: argparse.Namespace, task: str) -> list[dict]:
    rows = task_rows(args, task)
    data = args.out / f"{task}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for side, work in (("tunesmith", lambda: tunesmith_run(args, task, data, args.out / "tunesmith")),
                       ("trl", lambda: trl_run(args, task, rows, args.out / "trl"))):
        print(f"{task_label(args, task)}: {side} ...", flush=True)
        result = run_forked(work)
        if "error" in result:
            raise SystemExit(f"{task} on {side} failed: {result['error']}")
        results.append({"task": task, "side": side, **result})
    return results


def describe_grpo(args: argparse.Namespace) -> list[str]:
    """The GRPO settings both sides ran with, and what was left out to run the same."""
    s = grpo_settings(args)
    variant, words = TRL_VARIANTS[s["loss"]]
    trl_names = ", ".join(f"{k} {v}" for k, v in variant.items())
    lines = [f"grpo/{s['loss']} on both: {args.prompts} prompts x {args.group} completions of <= "
             f"{args.max_new_tokens} tokens a step, temperature 1, beta {s['beta']:g}, "
             f"epsilon {s['epsilon']:g}/{s['epsilon_high']:g} (low/high), {s['updates_per_batch']} "
             f"update(s) per sampled batch (TRL num_iterations), {words}",
             f"  TRL: {trl_names}; " + COMMON_SUBSET["all"]]
    if s["loss"] in COMMON_SUBSET:
        lines.append("  " + COMMON_SUBSET[s["loss"]])
    if s["updates_per_batch"] == 1:
        lines.append("  one update per sampled batch: the ratio pi/pi_old is 1, so no clip binds")
    return lines


def report(args: argparse.Namespace, results: list[dict]) -> None:
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # it forks each side, then only waits
    print(f"\nparent process: peak {parent:.0f} MB of RSS, inherited by each side and counted in its peak")
    if any(r["task"] == "grpo" for r in results):
        print("\n" + "\n".join(describe_grpo(args)))
    width = max(len(task_label(args, r["task"])) for r in results)
    print(f"\n{'task':{width}} {'side':16} {'steps/s':>8} {'s/step':>7} {'peak MB':>8} {'compl. tokens':>13} "
          f"{'reward':>7}")
    for r in results:
        memory = r.get("cuda_peak_mb", r["peak_rss_mb"])
        side = f"trl {r['trl']}" if r["side"] == "trl" else r["side"]
        extra = (f" {r['completion_tokens']:13.1f} {r['reward']:7.3f}" if "completion_tokens" in r and "reward" in r
                 else "")
        print(f"{task_label(args, r['task']):{width}} {side:16} {r['steps_per_s']:8.4f} {1 / r['steps_per_s']:7.2f} "
              f"{memory:8.0f}{extra}")
    for task in dict.fromkeys(r["task"] for r in results):
        ours, theirs = (next(r for r in results if r["task"] == task and r["side"] == s) for s in ("tunesmith", "trl"))
        memory = "cuda_peak_mb" if "cuda_peak_mb" in ours else "peak_rss_mb"
        line = (f"{task_label(args, task)}: tunesmith/TRL steps/s {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x, "
                f"peak memory {ours[memory] / theirs[memory]:.2f}x")
        if task == "grpo" and "completion_tokens" in ours and "completion_tokens" in theirs:
            line += (f", completion tokens {ours['completion_tokens'] / theirs['completion_tokens']:.2f}x, "
                     f"reward {ours.get('reward', float('nan')):.3f} vs {theirs.get('reward', float('nan')):.3f}")
        print(line)
        if task == "grpo":
            print(f"{task_label(args, task)}: reward of each sampled batch (step: reward; timed after step "
                  f"{args.warmup}; the same prompts at the same step)")
            for r, name in ((ours, "tunesmith"), (theirs, "trl")):
                print(f"  {name:9} " + "  ".join(f"{step}: {value:.3f}" for step, value in r["rewards"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["dpo", "grpo", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--batch", type=int, default=4, help="DPO: pairs per step")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO: prompts per step")
    parser.add_argument("--group", type=int, default=4, help="GRPO: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=192, help="DPO: tokens per sequence (GRPO: prompt + completion within 512)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--grpo-loss", choices=list(TRL_VARIANTS), default="grpo",
                        help="GRPO: the variant, set up the same on both sides (see the module docstring)")
    parser.add_argument("--updates-per-batch", type=int, default=1,
                        help="GRPO: policy updates per sampled batch (tunesmith grpo.updates_per_batch, TRL "
                             "num_iterations); --warmup and --steps must be multiples of it")
    parser.add_argument("--beta", type=float, help="GRPO: KL coefficient (default: the variant's)")
    parser.add_argument("--epsilon", type=float, help="GRPO: clip range below 1 (default: the variant's)")
    parser.add_argument("--epsilon-high", type=float, help="GRPO: clip range above 1 (default: the variant's, "
                                                           "else --epsilon)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-vs-trl")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.updates_per_batch < 1 or args.warmup % args.updates_per_batch or args.steps % args.updates_per_batch:
        parser.error("--warmup and --steps must be multiples of --updates-per-batch (whole sampled batches)")
    try:
        grpo_settings(args)
    except ValueError as err:
        parser.error(str(err))
    if importlib.util.find_spec("trl") is None:  # not imported here: the forked children would inherit it
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
    results = []
    for task in (["dpo", "grpo"] if args.task == "both" else [args.task]):
        results += compare(args, task)
    report(args, results)


if __name__ == "__main__":
    main()
