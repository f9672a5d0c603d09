"""Write the data of the example configs (configs/*.yaml) into examples/data/:

- ``pretrain.jsonl``: raw ``{"text": ...}`` documents (made-up weather-station reports) for
  ``task: pretrain`` (configs/pretrain.yaml);
- ``pairs.jsonl``: ``prompt``/``chosen``/``rejected`` preference pairs whose chosen reply is
  correct and polite and whose rejected one is wrong, rude or off-topic, for ``task: dpo`` and
  ``task: reward`` (configs/dpo.yaml, configs/reward.yaml);
- ``math.jsonl``: chat rows of easy arithmetic whose assistant turn ends in GSM8K's ``#### n``,
  the reference answer that ``tunesmith.rewards:gsm8k_exact`` grades, for ``task: grpo`` and
  ``task: ppo`` (configs/grpo.yaml, configs/ppo.yaml). The embedded SmolLM2-135M-Instruct gets
  about one sampled answer in five right (temperature 0.7), so groups of completions differ in reward.

The data are the project's own, generated from the word lists below with fixed seeds, so the
files are reproducible: ``python examples/make_example_data.py [FOLDER]`` (default: examples/data).
"""

import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"

NAMES = ["Maria", "Ahmed", "Lena", "Kofi", "Yuki", "Carlos", "Priya", "Olga", "Tomas", "Aisha", "Liam", "Mei",
         "Jonas", "Fatima", "Diego", "Sara", "Ivan", "Noor", "Emma", "Ravi"]
THINGS = ["apples", "pencils", "stamps", "marbles", "books", "shells", "cookies", "stickers", "coins", "plums"]
STATIONS = ["Bergen", "Lisbon", "Accra", "Osaka", "Quito", "Tbilisi", "Dublin", "Rabat", "Hanoi", "Krakow"]
SKIES = ["clear", "cloudy", "overcast", "hazy", "partly cloudy", "foggy"]
WEATHER = ["light rain", "heavy rain", "drizzle", "a short hail shower", "no rain", "snow flurries"]
WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
SEASONS = ["spring", "summer", "autumn", "winter"]
OBSERVERS = ["the morning observer", "the night keeper", "the station chief", "a visiting student"]
WORDS = ["garden", "window", "pencil", "rocket", "silver", "market", "candle", "forest", "bridge", "planet"]
RUDE = ["Figure it out yourself.", "That is a boring question. Ask someone else.", "Why would I help you with that?",
        "Not my problem."]
OFF_TOPIC = ["I like turtles.", "The weather is nice today, isn't it?", "Let me tell you about my favourite song."]


def degrees(value: int) -> str:
    return f"{value} degree" + ("" if abs(value) == 1 else "s")


def weather_report(rng: random.Random) -> str:
    """One station's day, four to six sentences of the same shape with varying readings."""
    station, day, season = rng.choice(STATIONS), rng.randint(1, 90), rng.choice(SEASONS)
    low = rng.randint(-8, 18)
    high = low + rng.randint(2, 12)
    wind, speed = rng.choice(WINDS), rng.randint(3, 60)
    pressure = rng.randint(985, 1035)
    sentences = [
        f"Station report from {station}, day {day} of {season}.",
        f"The morning was {rng.choice(SKIES)} with a low of {degrees(low)}; by mid-afternoon it reached "
        f"{degrees(high)}.",
        f"Wind from the {wind} at {speed} km/h, gusting to {speed + rng.randint(4, 20)} km/h.",
        f"Pressure stood at {pressure} hPa and was {'falling' if rng.random() < 0.5 else 'rising'} by evening.",
        f"Precipitation: {rng.choice(WEATHER)}.",
    ]
    if rng.random() < 0.6:
        sentences.append(f"Logged by {rng.choice(OBSERVERS)}; the rain gauge was emptied at "
                         f"{rng.randint(6, 21):02d}:00.")
    if speed > 45:
        sentences.append("A strong-wind warning was passed to the harbour office.")
    return " ".join(sentences)


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer ending in ``#### n``, n): an easy sum, difference, product or word problem."""
    kind = rng.choice(["add", "add", "subtract", "multiply", "story_add", "story_take"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if kind == "add":
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b
    if kind == "subtract":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}", a - b
    if kind == "multiply":
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        return f"What is {a} times {b}?", f"{a} x {b} = {a * b}", a * b
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if kind == "story_add":
        return (f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?",
                f"{name} has {a} + {b} = {a + b} {things}.", a + b)
    a, b = max(a, b) + 1, min(a, b)
    return (f"{name} has {a} {things} and gives {b} away. How many {things} are left?",
            f"{name} has {a} - {b} = {a - b} {things} left.", a - b)


def math_rows(rng: random.Random, count: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < count:
        question, worked, answer = arithmetic(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"{worked}\n#### {answer}"}]})
    return rows


def preference_pair(rng: random.Random) -> dict:
    """A request; the chosen reply is right and polite, the rejected one wrong, rude or off-topic."""
    kind = rng.choice(["arithmetic", "compare", "reverse", "sort", "note"])
    if kind == "arithmetic":
        question, worked, answer = arithmetic(rng)
        chosen = f"Sure! {worked}, so the answer is {answer}."
        wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        rejected = f"The answer is {wrong}." if rng.random() < 0.6 else rng.choice(RUDE)
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    if kind == "compare":
        a, b = rng.sample(range(10, 100), 2)
        prompt = f"Which number is larger, {a} or {b}?"
        chosen = f"{max(a, b)} is larger than {min(a, b)}."
        rejected = f"{min(a, b)} is larger." if rng.random() < 0.6 else rng.choice(OFF_TOPIC)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if kind == "reverse":
        word = rng.choice(WORDS)
        prompt = f"Could you spell the word '{word}' backwards, please?"
        chosen = f"Of course: '{word}' backwards is '{word[::-1]}'."
        scrambled = word[::-1][1:] + word[-1]
        rejected = f"'{word}' backwards is '{scrambled}'." if rng.random() < 0.6 else rng.choice(RUDE)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if kind == "sort":
        numbers = rng.sample(range(1, 50), 4)
        prompt = f"Please sort these numbers from smallest to largest: {', '.join(map(str, numbers))}."
        chosen = f"Here they are in order: {', '.join(map(str, sorted(numbers)))}."
        shuffled = numbers[:]
        while shuffled == sorted(numbers):
            rng.shuffle(shuffled)
        rejected = f"Here they are: {', '.join(map(str, shuffled))}." if rng.random() < 0.6 else rng.choice(RUDE)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    prompt = f"Can you write a one-line thank-you note to {name} for the {things}?"
    chosen = f"Dear {name}, thank you so much for the {things}; it was very kind of you!"
    rejected = rng.choice(RUDE + [f"{name}, I got the {things}. Whatever."])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl(target: Path, rows: list[dict]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {target}")


def main(folder: Path = DATA) -> None:
    rng = random.Random(20261201)
    write_jsonl(folder / "pretrain.jsonl", [{"text": weather_report(rng)} for _ in range(160)])
    rng = random.Random(20261202)
    pairs, seen = [], set()
    while len(pairs) < 300:
        pair = preference_pair(rng)
        if (pair["prompt"], pair["rejected"]) not in seen:
            seen.add((pair["prompt"], pair["rejected"]))
            pairs.append(pair)
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "math.jsonl", math_rows(random.Random(20261203), 200))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
