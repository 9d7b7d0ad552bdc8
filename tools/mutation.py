"""A small, self-contained mutation tester for ``companion``: does a plausible bug make the tests fail?

    python tools/mutation.py metrics mia pruning gcg --sample 60 --seed 0 --json out.json

For each module ``companion/<name>.py`` it lists every *mutant* (one small change of the source), takes a
seeded random sample of them (the sample depends only on the module's source and ``--seed``, so two runs
over the same source with different tests are comparable), and for each mutant runs the module's own test
file ``tests/test_<name>.py`` with ``-x -q``. A mutant is *killed* when a test fails (or the mutated module
no longer imports), *survives* when every test passes, *times out* when the run exceeds its limit.

The mutation operators (one application per mutant):

- comparisons ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``;
- arithmetic ``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``/``, ``%`` -> ``//``, ``**`` -> ``*`` (also in ``+=`` ...);
- boolean ``and`` <-> ``or``; dropping a unary ``-`` or a ``not``;
- constants ``0`` <-> ``1``, another int ``n`` -> ``n + 1``, a float ``x`` -> ``x + 1``, ``True`` <-> ``False``;
- ``return <expr>`` -> ``return None``.

Where: only inside function (and method) bodies. Skipped: docstrings and every string (error messages,
f-strings), ``raise`` statements, *argument-validation branches* (an ``if`` whose body only raises, and
calls to ``check_*`` / ``_check_*`` helpers: the bad-input tests pin those down separately), decorators,
default values and annotations. A mutant that unparses to the original source is dropped.

How it runs fast: the parent process imports the heavy libraries (and pytest's auto-loaded plugins) once and
``fork``s a child per mutant; the
child installs an import hook that serves the mutated module from memory (nothing is written to disk), then
runs ``pytest.main``. A baseline run with ``coverage`` (per-test contexts) records which tests execute each
line; a mutant runs only the tests that execute its lines (ordered fastest first), and a mutant on a line no
test executes is reported as *survived (not covered)* without running anything. The per-mutant time limit
is ``3 x`` the baseline time of its tests plus the start-up overhead, at least 60 s (a loaded machine
must not turn slow kills into time-outs).

``--root DIR`` takes ``companion/`` and ``tests/`` from another tree (e.g. ``git archive <commit>``
extracted somewhere) to measure an older test suite against the same mutants.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
            ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
BOOL_SWAP = {ast.And: ast.Or, ast.Or: ast.And}
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
          ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
          ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.And: "and", ast.Or: "or"}


# ---------------------------------------------------------------------------------------------
# Mutants
# ---------------------------------------------------------------------------------------------


@dataclass
class Mutant:
    index: int  # position of the mutated node in _nodes(tree)
    kind: str  # cmp / bin / aug / bool / unary / const / return
    detail: object  # which operator or value
    line: int
    end_line: int
    stmt_line: int  # first line of the innermost enclosing statement
    description: str
    source_line: str
    status: str = ""
    seconds: float = 0.0
    tests_run: int = 0


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node in a fixed (pre-order, field order) traversal: the same list for the same source."""
    out = []

    def visit(node):
        out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_validation_if(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and not node.orelse and all(isinstance(s, ast.Raise) for s in node.body)


def _mutable_nodes(tree: ast.Module) -> list[tuple[ast.AST, ast.stmt]]:
    """(node, innermost statement) for every node that mutations may touch (see the module docstring)."""
    found = []

    def visit(node, stmt, in_function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = node.body if isinstance(node.body, list) else [node.body]
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]  # the docstring
            for child in body:
                visit(child, child if isinstance(child, ast.stmt) else stmt, True)
            return  # decorators, defaults and annotations are not visited
        if isinstance(node, (ast.Raise, ast.JoinedStr)) or _is_validation_if(node):
            return
        if isinstance(node, ast.Call) and _call_name(node).lstrip("_").startswith("check"):
            return
        if isinstance(node, ast.AnnAssign):
            for child in (node.target, node.value):
                if child is not None:
                    visit(child, stmt, in_function)
            return
        if in_function:
            found.append((node, stmt))
        for child in ast.iter_child_nodes(node):
            visit(child, child if isinstance(child, ast.stmt) else stmt, in_function)

    for top in tree.body:
        visit(top, top, False)
    return found


def enumerate_mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    position = {id(node): i for i, node in enumerate(_nodes(tree))}
    lines = source.splitlines()
    mutants = []

    def add(node, stmt, kind, detail, description):
        mutants.append(Mutant(position[id(node)], kind, detail, node.lineno, node.end_lineno or node.lineno,
                              stmt.lineno, description, lines[node.lineno - 1].strip()))

    for node, stmt in _mutable_nodes(tree):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                new = CMP_SWAP[type(op)]
                add(node, stmt, "cmp", [i, new.__name__], f"`{SYMBOL[type(op)]}` -> `{SYMBOL[new]}`")
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BIN_SWAP:
            new = BIN_SWAP[type(node.op)]
            eq = "=" if isinstance(node, ast.AugAssign) else ""
            add(node, stmt, "bin", new.__name__, f"`{SYMBOL[type(node.op)]}{eq}` -> `{SYMBOL[new]}{eq}`")
        elif isinstance(node, ast.BoolOp):
            new = BOOL_SWAP[type(node.op)]
            add(node, stmt, "bool", new.__name__, f"`{SYMBOL[type(node.op)]}` -> `{SYMBOL[new]}`")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            add(node, stmt, "unary", None, "drop unary `-`" if isinstance(node.op, ast.USub) else "drop `not`")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None \
                and node.value is not Ellipsis:
            value = node.value
            if isinstance(value, bool):
                new = not value
            elif isinstance(value, int):
                new = 1 if value == 0 else 0 if value == 1 else value + 1
            elif isinstance(value, float):
                new = 1.0 if value == 0 else 0.0 if value == 1 else value + 1
            else:
                continue
            add(node, stmt, "const", new, f"`{value!r}` -> `{new!r}`")
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add(node, stmt, "return", None, "`return <expr>` -> `return None`")
    original = ast.unparse(tree)
    return [m for m in mutants if ast.unparse(apply_mutant(source, m)) != original]


def apply_mutant(source: str, mutant: Mutant) -> ast.Module:
    tree = ast.parse(source)
    nodes = _nodes(tree)
    node = nodes[mutant.index]
    if mutant.kind == "cmp":
        i, new = mutant.detail
        node.ops[i] = getattr(ast, new)()
    elif mutant.kind == "bin":
        node.op = getattr(ast, mutant.detail)()
    elif mutant.kind == "bool":
        node.op = getattr(ast, mutant.detail)()
    elif mutant.kind == "const":
        node.value = mutant.detail
    elif mutant.kind == "return":
        node.value = ast.Constant(value=None)
    elif mutant.kind == "unary":
        for parent in nodes:  # replace the UnaryOp by its operand in its parent
            for name, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, name, node.operand)
                elif isinstance(value, list) and any(v is node for v in value):
                    value[[i for i, v in enumerate(value) if v is node][0]] = node.operand
    return ast.fix_missing_locations(tree)


# ---------------------------------------------------------------------------------------------
# Running tests in forked children
# ---------------------------------------------------------------------------------------------


class _ServeFromMemory(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, fullname: str, code, path: str):
        self.fullname, self.code, self.path = fullname, code, path

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=self.path)
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = self.path
        exec(self.code, module.__dict__)


def _child_prepare(root: Path, log: str) -> None:
    os.chdir(root)
    sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, root.resolve())]
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError:  # the log folder vanished: run anyway (a failure to log is not a killed mutant)
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-W", "ignore", *tests]


def _fork(run, timeout: float) -> tuple[str, float]:
    """Run ``run()`` (returns an exit code) in a forked child; ('ok'|'fail'|'timeout', seconds)."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            code = run()
        except BaseException:  # noqa: BLE001 - anything the mutant breaks counts as a failure
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.perf_counter() - started
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("ok" if code == 0 else "fail"), elapsed
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed
        time.sleep(0.05)


def baseline(root: Path, module: str, test_file: str, log: str) -> dict:
    """Run the test file once with per-test coverage contexts: lines -> tests, test -> seconds."""
    target = str(root / "companion" / f"{module}.py")
    out = tempfile.mktemp(suffix=".json")

    def run():
        _child_prepare(root, log)
        import coverage
        import pytest

        cov = coverage.Coverage(data_file=None, include=[target], branch=False)
        durations = {}

        class Contexts:
            @pytest.hookimpl(hookwrapper=True)
            def pytest_runtest_protocol(self, item, nextitem):
                cov.switch_context(item.nodeid)
                yield

            def pytest_runtest_logreport(self, report):
                durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration

        cov.start()
        started = time.perf_counter()
        code = pytest.main(_pytest_args([test_file]), plugins=[Contexts()])
        wall = time.perf_counter() - started
        cov.stop()
        data = cov.get_data()
        by_line = {str(k): sorted(c for c in v if c) for k, v in data.contexts_by_lineno(target).items()}
        Path(out).write_text(json.dumps({"code": int(code), "lines": by_line, "durations": durations, "wall": wall}))
        return int(code)

    status, _ = _fork(run, timeout=3600)
    result = json.loads(Path(out).read_text()) if Path(out).exists() else {"code": -1}
    if status != "ok" or result["code"] != 0:
        raise SystemExit(f"baseline run of {test_file} failed (status {status}); see {log}")
    return result


def run_mutant(root: Path, module: str, source: str, mutant: Mutant, tests: list[str], timeout: float, log: str) -> str:
    path = str(root / "companion" / f"{module}.py")
    code = compile(apply_mutant(source, mutant), path, "exec")

    def run():
        _child_prepare(root, log)
        sys.meta_path.insert(0, _ServeFromMemory(f"companion.{module}", code, path))
        import pytest

        return int(pytest.main(_pytest_args(tests)))

    status, seconds = _fork(run, timeout)
    mutant.seconds = round(seconds, 2)
    return {"ok": "survived", "fail": "killed", "timeout": "timeout"}[status]


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _preload() -> None:
    """Import the heavy third-party libraries once in the parent, so every child starts warm. No torch
    computation runs in the parent (a forked child must not inherit a started thread pool)."""
    import coverage  # noqa: F401
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: F401
    import faker  # noqa: F401 - companion.data's names; slow to import (it scans its locales)
    from importlib.metadata import entry_points

    for plugin in entry_points(group="pytest11"):  # pytest's auto-loaded plugins (faker's, anyio's, ...)
        try:
            plugin.load()
        except Exception:  # noqa: BLE001 - a plugin that cannot load here is pytest's business
            pass


def mutate_module(root: Path, module: str, sample: int | None, seed: int, logs: Path,
                  previous: dict | None = None) -> dict:
    source = (root / "companion" / f"{module}.py").read_text()
    mutants = enumerate_mutants(source)
    generated = len(mutants)
    if sample is not None and sample < len(mutants):
        picked = sorted(random.Random(f"{seed}:{module}").sample(range(len(mutants)), sample))
        mutants = [mutants[i] for i in picked]
    done = {}
    if previous is not None:  # rerun only what survived (or timed out) last time; tests were only added
        done = {(m["index"], json.dumps(m["detail"])): m for m in previous["mutants"]
                if m["status"] == "killed"}
    test_file = f"tests/test_{module}.py"
    started = time.perf_counter()
    base = baseline(root, module, test_file, str(logs / f"{module}-baseline.log"))
    overhead = max(2.0, base["wall"] - sum(base["durations"].values()))
    print(f"{module}: {generated} mutants, {len(mutants)} sampled; baseline {base['wall']:.1f} s "
          f"({len(base['durations'])} tests)", flush=True)
    for i, mutant in enumerate(mutants):
        lines = set(range(mutant.line, mutant.end_line + 1)) | {mutant.stmt_line}
        tests = sorted({t for line in lines for t in base["lines"].get(str(line), [])},
                       key=lambda t: (base["durations"].get(t, 0.0), t))
        mutant.tests_run = len(tests)
        earlier = done.get((mutant.index, json.dumps(mutant.detail)))
        if earlier is not None:
            mutant.status, mutant.seconds = "killed", 0.0
            mutant.tests_run = earlier["tests_run"]
            continue
        if not tests:
            mutant.status = "not covered"
        else:
            limit = max(60.0, 3 * (overhead + sum(base["durations"].get(t, 0.0) for t in tests)))
            mutant.status = run_mutant(root, module, source, mutant, tests, limit,
                                       str(logs / f"{module}-{mutant.line}-{mutant.index}.log"))
        print(f"  [{i + 1}/{len(mutants)}] {module}.py:{mutant.line} {mutant.description}: {mutant.status} "
              f"({mutant.tests_run} tests, {mutant.seconds:.1f} s)", flush=True)
    counts = {s: sum(m.status == s for m in mutants) for s in ("killed", "survived", "not covered", "timeout")}
    return {"module": module, "generated": generated, "sampled": len(mutants), **counts,
            "seconds": round(time.perf_counter() - started, 1), "mutants": [asdict(m) for m in mutants]}


def markdown(results: list[dict]) -> str:
    rows = ["| module | generated | sampled | killed | survived (tests pass) | survived (not covered) | timed out | time |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['module']} | {r['generated']} | {r['sampled']} | {r['killed']} | {r['survived']} | "
                    f"{r['not covered']} | {r['timeout']} | {r['seconds']:.0f} s |")
    rows.append("")
    for r in results:
        alive = [m for m in r["mutants"] if m["status"] in ("survived", "not covered")]
        if alive:
            rows.append(f"Surviving in `{r['module']}`:")
            rows.append("")
            for m in alive:
                note = " (no test executes the line)" if m["status"] == "not covered" else ""
                rows.append(f"- `companion/{r['module']}.py:{m['line']}` {m['description']}{note}: `{m['source_line']}`")
            rows.append("")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", help="module names under companion/ (e.g. metrics mia)")
    parser.add_argument("--sample", type=int, default=None, help="mutants per module (seeded sample); all if omitted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=REPO, help="tree holding companion/ and tests/")
    parser.add_argument("--json", type=Path, default=None, help="write every mutant's result here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the summary table here")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--rerun-survivors", type=Path, default=None,
                        help="a previous --json result over the same source: keep its killed mutants, rerun the rest")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.list:
        for module in args.modules:
            for m in enumerate_mutants((root / "companion" / f"{module}.py").read_text()):
                print(f"{module}.py:{m.line} {m.description}: {m.source_line}")
        return
    _preload()
    logs = Path(tempfile.mkdtemp(prefix="mutation-logs-"))
    print(f"logs: {logs}", flush=True)
    previous = {}
    if args.rerun_survivors:
        previous = {r["module"]: r for r in json.loads(args.rerun_survivors.read_text())}
    results = []
    for module in args.modules:
        if module in previous and (previous[module]["sampled"], previous[module]["seed"]) != (
                min(args.sample or 10**9, previous[module]["generated"]), args.seed):
            raise SystemExit(f"{args.rerun_survivors} used another sample or seed for {module}")
        results.append(mutate_module(root, module, args.sample, args.seed, logs, previous.get(module)))
        results[-1]["seed"] = args.seed
        if args.json:  # after every module, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
