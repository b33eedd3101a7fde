"""The loop of the mutation scripts (triton_mutations.py, cuda_mutations.py).

Copies the checkout to a temporary directory, then for each mutation writes
the mutated source file there and runs one test file with -x; a mutation the
tests do not catch is reported. Not a test module (no test_ prefix).
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]

Mutation = Tuple[str, str, str]  # (what the bug is, text in the source, the buggy replacement)


def check_mutations(source: str, mutations: Sequence[Mutation], test_file: str,
                    build: Optional[Callable[[pathlib.Path], bool]] = None,
                    env: Optional[Dict[str, str]] = None) -> int:
    """Apply each mutation to ``source`` (relative to the checkout) in a copy and run ``test_file``.

    ``build(copy)``, if given, builds the copy: once before the first mutation,
    and after each (a mutation that does not build counts as caught). The
    unmutated copy must pass. Returns the exit status: 1 if a mutation was
    missed, else 0.
    """
    original = (ROOT / source).read_text()
    for what, text, _ in mutations:
        if original.count(text) != 1:
            raise SystemExit(f"mutation {what!r}: expected its text once in {source}, found {original.count(text)}")
    env = {**os.environ, **(env or {})}
    test = [sys.executable, "-m", "pytest", test_file, "-x", "-q", "-p", "no:cacheprovider"]
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "checkout"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info"))
        if (build and not build(copy)) or subprocess.run(test, cwd=copy, env=env, capture_output=True).returncode:
            raise SystemExit(f"the unmutated checkout does not build or pass {test_file}")
        for what, text, bug in mutations:
            (copy / source).write_text(original.replace(text, bug))
            if build and not build(copy):
                print(f"caught (does not build): {what}", flush=True)
                continue
            run = subprocess.run(test, cwd=copy, env=env, capture_output=True, text=True)
            failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
            caught = run.returncode != 0
            reason = f"  <- {failed[0][7:100]}" if failed else f"  <- exit {run.returncode}" if caught else ""
            print(f"{'caught' if caught else 'MISSED'}: {what}{reason}", flush=True)
            if not caught:
                missed.append(what)
    print(f"{len(mutations) - len(missed)} of {len(mutations)} mutations caught")
    return 1 if missed else 0
