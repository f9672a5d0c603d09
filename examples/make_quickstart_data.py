"""Write examples/data/quickstart.jsonl: sentences about a person -> a JSON record of them.

The data are the project's own, generated from the word lists below with a fixed seed, so the
file is reproducible: `python examples/make_quickstart_data.py`. The demo's prompt uses a name,
city and job that appear in no training row.
"""

import json
import random
from pathlib import Path

NAMES = ["Maria", "Ahmed", "Lena", "Kofi", "Yuki", "Carlos", "Priya", "Olga", "Tomas", "Aisha", "Liam", "Mei",
         "Jonas", "Fatima", "Diego", "Sara", "Ivan", "Noor", "Emma", "Ravi", "Chloe", "Mateo", "Hana", "Omar",
         "Elena", "Kwame", "Sofia", "Arjun", "Nadia", "Lucas", "Ines", "Mohammed", "Zara", "Felix", "Amara",
         "Hugo", "Leila", "Pedro", "Anya", "Sami"]
CITIES = ["Lisbon", "Cairo", "Berlin", "Accra", "Osaka", "Lima", "Pune", "Kyiv", "Prague", "Nairobi", "Dublin",
          "Taipei", "Bergen", "Rabat", "Quito", "Malmo", "Tbilisi", "Amman", "Lyon", "Chennai", "Porto",
          "Kumasi", "Seville", "Mysore", "Tunis", "Leeds", "Bilbao", "Hanoi", "Krakow", "Denver"]
JOBS = ["nurse", "engineer", "teacher", "farmer", "pilot", "chef", "lawyer", "painter", "plumber", "dentist",
        "librarian", "carpenter", "journalist", "pharmacist", "architect", "electrician", "accountant",
        "photographer", "gardener", "mechanic"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} from {city}.",
    "{name} works as a {job} in {city} and is {age} years old.",
    "At {age}, {name} is still working as a {job} in {city}.",
    "My neighbour {name} moved to {city} last year; {pronoun}'s {age} and works as a {job}.",
    "{name} ({age}) has been a {job} in {city} for years.",
    "Born {age} years ago, {name} now lives in {city}, where {pronoun} works as a {job}.",
    "The new {job} in {city} is {name}, who is {age}.",
    "{name}, a {job} aged {age}, comes from {city}.",
    "I met {name} in {city}. {pronoun_cap} is {age} and a {job}.",
]


def main() -> None:
    rng = random.Random(20261123)
    rows = []
    for index in range(240):
        person = {"name": rng.choice(NAMES), "age": rng.randint(19, 78), "city": rng.choice(CITIES),
                  "job": rng.choice(JOBS)}
        pronoun = rng.choice(["he", "she"])
        sentence = TEMPLATES[index % len(TEMPLATES)].format(**person, pronoun=pronoun,
                                                            pronoun_cap=pronoun.capitalize())
        reply = json.dumps(person)
        rows.append({"messages": [{"role": "user", "content": sentence}, {"role": "assistant", "content": reply}]})
    target = Path(__file__).parent / "data" / "quickstart.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {target}")


if __name__ == "__main__":
    main()
