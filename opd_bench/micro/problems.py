"""Seeded generators for the micro world's two tasks.

`micro-math`: multi-step integer arithmetic, answered with a chain of thought and `\\boxed{}`.
`micro-code`: a small Python function given by input/output examples, answered with code and
scored by hidden tests.

Each problem carries a ground-truth solution in two styles. Both compute in the same order and are
equally easy; they differ only in notation, so a model trained on one assigns low probability to the
other (the basis of the teacher-consistency experiment):
  math A  `12+7=19` / newline           math B  `12 + 7 = 19;` / spaces, semicolons
  code A  `def f(x):` / `return ...`    code B  `f = lambda x: ...`

Train and eval never share a prompt: a prompt whose hash falls in the held-out bucket is used only
for evaluation, so the train generator can be sampled forever without leaking the eval set.
"""

from __future__ import annotations

import hashlib
import random
import re

from opd_bench.tasks import Problem

HELD_OUT_BUCKETS = 8  # 1 in 8 prompts is reserved for evaluation


def is_held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


# ----------------------------------------------------------------------------- micro-math

MATH_OPS = (2, 3, 4)  # number of operations: the difficulty splits


def _math_steps(rng: random.Random, n_ops: int) -> tuple[int, list[tuple[str, int, int, int]]]:
    """A start value and n_ops left-to-right steps (op, lhs, rhs, result).

    One-digit operands and results in [0, 99] keep each step learnable by a sub-1M-parameter model in
    minutes on a CPU; difficulty comes from chaining steps (errors compound), which is what separates
    the teacher from the smaller student.
    """
    value = rng.randint(10, 99)
    start, steps = value, []
    while len(steps) < n_ops:
        op = rng.choice("+-*")
        rhs = rng.randint(2, 9) if op == "*" else rng.randint(1, 9)
        result = {"+": value + rhs, "-": value - rhs, "*": value * rhs}[op]
        if 0 <= result <= 99:
            steps.append((op, value, rhs, result))
            value = result
    return start, steps


def _math_expression(start: int, steps: list[tuple[str, int, int, int]]) -> str:
    """Standard notation whose evaluation order is left to right: parenthesise a +/- prefix before *."""
    expr, last_additive = str(start), False
    for op, _, rhs, _ in steps:
        if op == "*" and last_additive:
            expr = f"({expr})"
        expr += f"{op}{rhs}"
        last_additive = op in "+-"
    return expr


def make_math_problem(rng: random.Random, n_ops: int) -> Problem:
    start, steps = _math_steps(rng, n_ops)
    prompt = _math_expression(start, steps)
    answer = str(steps[-1][3])
    style_a = "".join(f"{a}{op}{b}={c}\n" for op, a, b, c in steps) + f"\\boxed{{{answer}}}"
    style_b = "".join(f"{a} {op} {b} = {c}; " for op, a, b, c in steps) + f"\\boxed{{{answer}}}"
    pid = "math-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return Problem(pid, "micro-math", f"ops-{n_ops}", prompt, answer, {"A": style_a, "B": style_b})


_STEP = {"A": re.compile(r"(\d+)([+*-])(\d+)=(\d+)\n"), "B": re.compile(r"(\d+) ([+*-]) (\d+) = (\d+); ")}
_FIX = {"A": "{a}{op}{b}={wrong}!{c}\n", "B": "{a} {op} {b} = {wrong} ! {c}; "}


def with_corrections(solution: str, style: str, rng: random.Random, rate: float) -> tuple[str, list[tuple[int, int]]]:
    """A math solution in which each step is, with probability `rate`, first written with a wrong
    result and then corrected (`46*2=93!92`), and the character spans of the wrong results.

    Training on it with the wrong results masked out of the loss gives a teacher that never makes
    such an error itself but knows what to do after one: the states a student reaches by its own
    mistakes, which SFT on the teacher's samples never shows it and on-policy distillation does.
    """
    out, spans, pos = [], [], 0
    for m in _STEP[style].finditer(solution):
        out.append(solution[pos:m.start()])
        a, op, b, c = m.groups()
        if rng.random() < rate:
            wrong = int(c) + rng.choice((-10, -2, -1, 1, 2, 10))
            if not 0 <= wrong <= 99:
                wrong = rng.choice([v for v in range(100) if v != int(c)])
            text = _FIX[style].format(a=a, op=op, b=b, wrong=wrong, c=c)
            start = sum(map(len, out)) + text.index(str(wrong), text.index("="))
            spans.append((start, start + len(str(wrong))))
            out.append(text)
        else:
            out.append(m.group(0))
        pos = m.end()
    out.append(solution[pos:])
    return "".join(out), spans


# ----------------------------------------------------------------------------- micro-code

def _fmt(values) -> str:
    return "[" + ",".join(map(str, values)) + "]" if isinstance(values, list) else str(values)


def _random_list(rng: random.Random, lo: int = 0, hi: int = 9) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 4))]


def _code_linear(rng):
    a, b = rng.randint(1, 9), rng.randint(0, 49)
    fx = lambda x: a * x + b  # noqa: E731
    examples = " ".join(f"f({x})=={fx(x)}" for x in (0, 1, 2))
    # b is read off f(0); a is one subtraction, like a micro-math step.
    reasoning = f"# b={b}\n# a={fx(1)}-{b}={a}\n"
    hidden = [rng.randint(3, 30) for _ in range(3)]
    tests = [f"assert f({x})=={fx(x)}" for x in hidden]
    return examples, reasoning, f"{a}*x+{b}", tests


def _code_list_map(op):
    def make(rng):
        k = rng.randint(1, 9) if op == "+" else rng.randint(2, 9)
        fn = (lambda v: v + k) if op == "+" else (lambda v: v * k)
        # The first shown element is 1, so k can be read off (mul) or found by one subtraction (add).
        first = [1] + _random_list(rng, 0, 9)[:2]
        reasoning = f"# k={fn(1)}-1={k}\n" if op == "+" else f"# k={k}\n"
        examples = f"f({_fmt(first)})=={_fmt([fn(v) for v in first])}"
        tests = [f"assert f({_fmt(xs)})=={_fmt([fn(v) for v in xs])}"
                 for xs in (_random_list(rng, 0, 20) for _ in range(3))] + ["assert f([])==[]"]
        return examples, reasoning, f"[v{op}{k} for v in x]", tests
    return make


def _code_list_builtin(name, fn, body):
    def make(rng):
        shown = [_random_list(rng) for _ in range(2)]
        examples = " ".join(f"f({_fmt(xs)})=={_fmt(fn(xs))}" for xs in shown)
        tests = [f"assert f({_fmt(xs)})=={_fmt(fn(xs))}"
                 for xs in (_random_list(rng, 0, 50) for _ in range(3))]
        return examples, f"# {name}\n", body, tests
    return make


CODE_FAMILIES = {
    "linear": _code_linear,
    "map-add": _code_list_map("+"),
    "map-mul": _code_list_map("*"),
    "reverse": _code_list_builtin("reverse", lambda xs: xs[::-1], "x[::-1]"),
    "sort": _code_list_builtin("sort", sorted, "sorted(x)"),
    "sum": _code_list_builtin("sum", sum, "sum(x)"),
    "max": _code_list_builtin("max", max, "max(x)"),
}


def make_code_problem(rng: random.Random, family: str) -> Problem:
    examples, reasoning, body, tests = CODE_FAMILIES[family](rng)
    prompt = examples
    style_a = f"{reasoning}def f(x):\n    return {body}"
    style_b = f"{reasoning.replace('=', ' = ')}f = lambda x: {body}"
    pid = "code-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return Problem(pid, "micro-code", family, prompt, "\n".join(tests), {"A": style_a, "B": style_b})


# ----------------------------------------------------------------------------- sampling

def _draw(task: str, rng: random.Random) -> Problem:
    if task == "micro-math":
        return make_math_problem(rng, rng.choice(MATH_OPS))
    if task == "micro-code":
        return make_code_problem(rng, rng.choice(list(CODE_FAMILIES)))
    raise ValueError(f"unknown micro task {task!r}")


def train_problems(task: str, n: int, seed: int) -> list[Problem]:
    """n training problems (duplicates allowed: they follow the generator's distribution)."""
    rng, out = random.Random(f"{task}-train-{seed}"), []
    while len(out) < n:
        problem = _draw(task, rng)
        if not is_held_out(problem.prompt):
            out.append(problem)
    return out


def eval_problems(task: str, n_per_split: int, seed: int = 0) -> list[Problem]:
    """Held-out problems, n_per_split distinct prompts for each difficulty split."""
    splits = [f"ops-{n}" for n in MATH_OPS] if task == "micro-math" else list(CODE_FAMILIES)
    rng, seen, out = random.Random(f"{task}-eval-{seed}"), set(), []
    for split in splits:
        count = 0
        while count < n_per_split:
            if task == "micro-math":
                problem = make_math_problem(rng, int(split.split("-")[1]))
            else:
                problem = make_code_problem(rng, split)
            if is_held_out(problem.prompt) and problem.prompt not in seen:
                seen.add(problem.prompt)
                out.append(problem)
                count += 1
    return out
