"""Writes train.jsonl and heldout.jsonl for the SQL-style expert (deterministic).

Questions about one table, ``employees(name, department, salary, city, hired)``, answered with a
single SQL query in a fixed style: upper-case keywords, one line, ending with ``;``.

    python examples/experts/sql/make_data.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SCHEMA = "Table employees(name TEXT, department TEXT, salary INTEGER, city TEXT, hired DATE)."
DEPARTMENTS = ["sales", "research", "support", "finance", "legal"]
CITIES = ["Paris", "Berlin", "Lyon", "Munich", "Turin"]
TASKS = [
    ("List the names of employees in {d}.", "SELECT name FROM employees WHERE department = '{d}';"),
    ("How many employees work in {c}?", "SELECT COUNT(*) FROM employees WHERE city = '{c}';"),
    ("What is the average salary in {d}?", "SELECT AVG(salary) FROM employees WHERE department = '{d}';"),
    ("Who earns more than {s}?", "SELECT name FROM employees WHERE salary > {s};"),
    ("Show the {n} best paid employees.", "SELECT name, salary FROM employees ORDER BY salary DESC LIMIT {n};"),
    ("Count employees per department.", "SELECT department, COUNT(*) FROM employees GROUP BY department;"),
    (
        "Which employees in {c} were hired after {y}?",
        "SELECT name FROM employees WHERE city = '{c}' AND hired > '{y}-01-01';",
    ),
]


def record(rng: random.Random) -> dict:
    question, sql = rng.choice(TASKS)
    values = {"d": rng.choice(DEPARTMENTS), "c": rng.choice(CITIES), "s": rng.randrange(30000, 120000, 5000),
              "n": rng.randint(2, 10), "y": rng.randint(2010, 2023)}  # fmt: skip
    return {"messages": [{"role": "user", "content": f"{SCHEMA}\nWrite one SQL query: {question.format(**values)}"},
                         {"role": "assistant", "content": sql.format(**values)}]}  # fmt: skip


def main() -> None:
    rng = random.Random(0)
    for name, n in (("train.jsonl", 200), ("heldout.jsonl", 40)):
        (HERE / name).write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(n)))
        print(f"wrote {HERE / name} ({n} records)")


if __name__ == "__main__":
    main()
