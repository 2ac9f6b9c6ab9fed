"""The code verifier against real bubblewrap sandboxes: correctness of both test styles and what
hostile code must not be able to do (each adversarial test asserts the harm did not happen)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sandlab.verification import (
    INFRA_ERROR,
    MEMORY,
    NO_CODE,
    PASS,
    RUNTIME_ERROR,
    SKIPPED,
    TIMEOUT,
    WRONG_ANSWER,
    CodeItem,
    CodeVerifier,
    SandboxUnavailable,
    TestCase,
    extract_code,
)
from sandlab.verification.sandbox import wait_until_gone
from sandlab.verification.verify import stdout_matches, value_matches

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 2.0

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap sandboxes are Linux-only")


@pytest.fixture(scope="module")
def verifier():
    with CodeVerifier(workers=2, timeout_s=TIMEOUT_S, memory_mb=512) as v:
        yield v


def run(verifier, code, tests, fn_name=None, pass_fraction=False):
    return verifier.verify(CodeItem(code, tuple(tests), fn_name, pass_fraction))


def stdin(i, o):
    return TestCase(i, o, "stdin")


def fn(args, out, unwrap=False):
    return TestCase("\n".join(json.dumps(a) for a in args), json.dumps(out), "functional", unwrap)


def block(code):
    return "Here is my solution.\n\n```python\n" + textwrap.dedent(code).strip() + "\n```\n"


# ---- comparison rules (no sandbox) ---------------------------------------------------------------
def test_stdout_rules():
    assert stdout_matches("1.0\n", "1")[0]
    assert stdout_matches("3 4.50\n\n", "3 4.5")[0]
    assert stdout_matches("  a b  \r\nc", "a b\nc")[0]
    assert not stdout_matches("1\n2", "1\n2\n3")[0]  # a prefix of the expected lines
    assert not stdout_matches("1\n2\n3", "1\n2")[0]
    assert not stdout_matches("1 2", "1 2 3")[0]
    assert not stdout_matches("YES", "NO")[0]
    assert not stdout_matches("1.0001", "1")[0]


def test_value_rules():
    assert value_matches("[1, 2]", "[1,2]")[0]
    assert value_matches("1.0", "1")[0]
    assert not value_matches("[1, 2]", "[2, 1]")[0]
    assert value_matches("5", "[5]", unwrap=True)[0]
    assert not value_matches("5", "[5]")[0]
    big = "1" * 5000  # beyond Python's default int-string limit
    assert value_matches(big, big)[0]


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("<think>```python\ndraft = 1\n```</think>\nfinal:\n```py\nfinal = 2\n```") == "final = 2\n"
    assert extract_code("<think>```python\ndraft = 1\n```</think> no code here") == "draft = 1\n"
    assert extract_code("I cannot solve this.") is None
    assert extract_code("42") is None
    assert extract_code("```python\nunterminated = 1\n") is None
    assert extract_code("print(input())") == "print(input())"


# ---- correctness ---------------------------------------------------------------------------------
def test_stdin_correct_and_wrong(verifier):
    tests = [stdin("3 4\n", "7\n"), stdin("10 -2\n", "8\n")]
    good = run(verifier, block("a, b = map(int, input().split())\nprint(a + b)"), tests)
    assert good.passed and good.pass_frac == 1.0 and good.statuses == [PASS, PASS] and good.sandboxed
    bad = run(verifier, block("a, b = map(int, input().split())\nprint(a * b)"), tests)
    assert not bad.passed and bad.statuses == [WRONG_ANSWER, SKIPPED]
    frac = run(verifier, block("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"), tests, pass_fraction=True)
    assert frac.statuses == [PASS, WRONG_ANSWER] and frac.pass_frac == 0.5


def test_stdin_reading_styles(verifier):
    tests = [stdin("2\n5\n6\n", "11\n")]
    for code in ("import sys\ndata = sys.stdin.read().split()\nprint(int(data[1]) + int(data[2]))",
                 "n = int(input())\nprint(sum(int(input()) for _ in range(n)))",
                 "data = open(0).read().split()\nprint(int(data[1]) + int(data[2]))",
                 "import sys\nv = sys.stdin.buffer.read().split()\nsys.stdout.write(str(int(v[1]) + int(v[2])) + '\\n')"):
        assert run(verifier, block(code), tests).passed, code


def test_float_output_equals_integer(verifier):
    assert run(verifier, block("print(1.0)"), [stdin("", "1")]).passed


def test_prefix_output_fails(verifier):
    result = run(verifier, block("print(1)\nprint(2)"), [stdin("", "1\n2\n3\n")])
    assert result.statuses == [WRONG_ANSWER] and "lines" in result.detail


def test_functional_tuple_list_and_solution_class(verifier):
    code = block('''
        class Solution:
            def twoSum(self, nums: List[int], target: int) -> List[int]:
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return (seen[target - x], i)
                    seen[x] = i
    ''')
    tests = [fn([[2, 7, 11, 15], 9], [0, 1]), fn([[3, 2, 4], 6], [1, 2])]
    result = run(verifier, code, tests, fn_name="twoSum")
    assert result.passed, result
    assert not run(verifier, code, [fn([[3, 2, 4], 6], [2, 1])], fn_name="twoSum").passed


def test_functional_plain_function_and_unwrap(verifier):
    code = block("def add(a, b):\n    return a + b")
    assert run(verifier, code, [fn([1, 2], [3], unwrap=True)], fn_name="add").passed
    assert not run(verifier, code, [fn([1, 2], [3])], fn_name="add").passed


def test_exit_inside_solution_and_main_guard(verifier):
    assert run(verifier, block("print(5)\nexit()"), [stdin("", "5")]).passed
    assert run(verifier, block("import sys\nprint(5)\nsys.exit(0)"), [stdin("", "5")]).passed
    guard = block("def main():\n    print(int(input()) + 1)\n\nif __name__ == '__main__':\n    main()")
    assert run(verifier, guard, [stdin("1", "2")]).passed


def test_deep_recursion_and_big_integers(verifier):
    deep = block('''
        import sys
        sys.setrecursionlimit(100000)
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
        print(depth(int(input())))
    ''')
    assert run(verifier, deep, [stdin("30000", "30000")]).passed
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # only to write the expected values here
    try:
        big = str(3 ** 20000)
        big_test = fn([20000], 3 ** 20000)
    finally:
        sys.set_int_max_str_digits(limit)
    assert run(verifier, block("print(3 ** int(input()))"), [stdin("20000", big)]).passed
    assert run(verifier, block("def f(n):\n    return 3 ** n"), [big_test], fn_name="f").passed
    assert not run(verifier, block("print(3 ** int(input()) + 1)"), [stdin("20000", big)]).passed


def test_program_tests(verifier):
    check = TestCase("def check(candidate):\n    assert candidate(2) == 4\n\ncheck(square)\n", "", "program")
    assert run(verifier, block("def square(x):\n    return x * x"), [check]).passed
    assert run(verifier, block("def square(x):\n    return x + x + 1"), [check]).statuses == [RUNTIME_ERROR]
    # exit() before the checks run must not count as passing them
    assert not run(verifier, block("import sys\ndef square(x):\n    return 0\nsys.exit(0)"), [check]).passed


def test_no_code_and_syntax_error(verifier):
    result = run(verifier, "I am not sure how to solve this.", [stdin("", "1"), stdin("", "2")])
    assert result.statuses == [NO_CODE, NO_CODE] and not result.passed
    assert run(verifier, block("print(1"), [stdin("", "1")]).statuses == [RUNTIME_ERROR]


# ---- adversarial: each asserts what must not happen ---------------------------------------------
def timed(verifier, code, tests, **kw):
    start = time.monotonic()
    result = run(verifier, block(code), tests, **kw)
    return result, time.monotonic() - start


def test_infinite_loop_sigxcpu_and_sleep_cost_only_their_limit(verifier):
    for code in ("while True:\n    pass",
                 "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
                 "import time\ntime.sleep(3600)"):
        result, took = timed(verifier, code, [stdin("", "1"), stdin("", "1")])
        assert result.statuses == [TIMEOUT, SKIPPED], code
        assert took < TIMEOUT_S + 3, f"{code!r} took {took:.1f} s"


def test_timeout_then_later_tests_still_run_with_pass_fraction(verifier):
    code = "n = int(input())\nwhile n == 0:\n    pass\nprint(n)"
    result = run(verifier, block(code), [stdin("0", "0"), stdin("2", "2")], pass_fraction=True)
    assert result.statuses == [TIMEOUT, PASS] and result.pass_frac == 0.5


def test_memory_fork_bomb_and_threads_are_contained(verifier):
    assert run(verifier, block("x = bytearray(2 * 1024 ** 3)\nprint(1)"), [stdin("", "1")]).statuses == [MEMORY]
    bomb, took = timed(verifier, "import os\nwhile True:\n    os.fork()", [stdin("", "1")])
    assert not bomb.passed and took < TIMEOUT_S + 5
    threads = run(verifier, block("import threading, time\nts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(200)]\n"
                                  "[t.start() for t in ts]\nprint(1)"), [stdin("", "1")])
    assert not threads.passed
    assert run(verifier, block("print(1)"), [stdin("", "1")]).passed  # and the slot still works afterwards


def test_kill_all_and_daemons_leave_nothing_behind(verifier):
    result = run(verifier, block("import os\nos.kill(-1, 9)\nprint(1)"), [stdin("", "1")])
    assert not result.passed  # we are still here to see it
    daemon = '''
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        print(1)
    '''
    assert run(verifier, block(daemon), [stdin("", "1")]).passed
    if os.geteuid() == 0:
        assert not any(wait_until_gone(uid) for uid in verifier.sandbox.uids)


def test_filesystem_is_read_only_and_small(verifier, tmp_path):
    target = ROOT / "tests" / "written_by_sandbox.txt"
    writes = f'''
        import os
        hits = []
        for path in ("/usr/evil.txt", "/problem/evil.txt", {str(target)!r}):
            try:
                open(path, "w").write("x")
                hits.append(path)
            except OSError:
                pass
        try:
            with open("/tmp/big", "wb") as fh:
                for _ in range(100):
                    fh.write(b"x" * 1024 * 1024)
            hits.append("/tmp/big")
        except OSError:
            pass
        print(len(hits), *hits)
    '''
    assert run(verifier, block(writes), [stdin("", "0")]).passed
    assert not target.exists()


def test_stdout_flood_costs_only_its_limit(verifier):
    result, took = timed(verifier, "while True:\n    print('x' * 10000)", [stdin("", "x")])
    assert result.statuses in ([RUNTIME_ERROR], [TIMEOUT]) and took < TIMEOUT_S + 5


def test_secrets_and_repository_are_invisible(verifier, monkeypatch):
    monkeypatch.setenv("SANDLAB_TEST_SECRET", "hunter2")
    probe = f'''
        import os
        leaks = [k for k in os.environ if "SECRET" in k]
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if b"hunter2" in open(f"/proc/{{pid}}/environ", "rb").read():
                        leaks.append(pid)
                except OSError:
                    pass
        leaks += [p for p in ({str(ROOT)!r}, {str(Path.home())!r}) if os.path.exists(p)]
        print(len(leaks))
    '''
    result = run(verifier, block(probe), [stdin("", "0")])
    assert result.passed, result


def test_no_network_even_to_loopback(verifier):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    print('reached')\nexcept OSError:\n    print('blocked')"
    try:
        result = run(verifier, block(code), [stdin("", "blocked")])
        with pytest.raises(BlockingIOError):  # nothing is waiting in the listener's backlog
            listener.accept()
    finally:
        listener.close()
    assert result.passed


def test_result_forgery_fails(verifier):
    always_equal = block('''
        class Anything:
            def __eq__(self, other):
                return True
        class Solution:
            def f(self, x):
                return Anything()
    ''')
    assert not run(verifier, always_equal, [fn([1], 2)], fn_name="f").passed
    subclass = block("class Liar(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Liar(7)")
    assert not run(verifier, subclass, [fn([1], 2)], fn_name="f").passed
    forged_line = '{"ev": "result", "t": 0, "status": "ok", "res": "2"}\\n{"ev": "done"}\\n'
    atexit_forgery = block(f'''
        import atexit, os, sys
        def forge():
            for fd in (1, 3, 4, 5):
                try:
                    os.write(fd, b'{forged_line}')
                except OSError:
                    pass
        atexit.register(forge)
        def f(x):
            forge()
            return 0
    ''')
    assert not run(verifier, atexit_forgery, [fn([1], 2)], fn_name="f").passed
    early_exit = block("import os\ndef f(x):\n    os._exit(0)")
    assert run(verifier, early_exit, [fn([1], 2), fn([2], 3)], fn_name="f").statuses == [RUNTIME_ERROR, SKIPPED]
    frames = block("import sys\ndef f(x):\n    return sorted(sys._getframe(1).f_locals)")
    assert run(verifier, frames, [fn([1], 2)], fn_name="f").statuses == [RUNTIME_ERROR]
    json_patch = block("import json\njson.dumps = lambda *a, **k: '2'\ndef f(x):\n    return 0")
    assert not run(verifier, json_patch, [fn([1], 2)], fn_name="f").passed


def test_parallel_batch_keeps_order(verifier):
    items = [CodeItem(block(f"print({i})"), (stdin("", str(i if i % 3 else -1)),)) for i in range(12)]
    results = verifier.verify_many(items)
    assert [r.passed for r in results] == [bool(i % 3) for i in range(12)]


# ---- infrastructure ------------------------------------------------------------------------------
def test_missing_interpreter_is_one_line():
    with pytest.raises(SandboxUnavailable, match="does not exist"):
        CodeVerifier(workers=1, python="/nonexistent/python3")


def test_infra_error_is_not_a_fail(monkeypatch, verifier):
    original = verifier.sandbox.command

    def broken(slot, limits, cpu_s, fd):
        argv, path = original(slot, limits, cpu_s, fd)
        return ["/bin/false", *argv[1:]], path

    monkeypatch.setattr(verifier.sandbox, "command", broken)
    before = verifier.infra_retries
    result = run(verifier, block("print(1)"), [stdin("", "1")])
    assert result.statuses == [INFRA_ERROR] and result.infra_error and not result.passed
    assert verifier.infra_retries == before + 2  # retried once


def test_cli_adds_verdicts_and_rejects_malformed_lines(tmp_path):
    good = {"response": block("print(int(input()) * 2)"), "tests": [{"input": "2", "output": "4", "testtype": "stdin"}]}
    bad = {"response": block("print(0)"), "tests": [{"input": "2", "output": "4", "testtype": "stdin"}]}
    lines = "\n".join(json.dumps(r) for r in (good, bad)) + "\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "sandlab.verification.cli", "--timeout", "2"], input=lines, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["passed"] for r in rows] == [True, False] and rows[1]["statuses"] == [WRONG_ANSWER] and rows[0]["pass_frac"] == 1.0
    malformed = lines + '{"response": "x", "tests": [{"output": "1"}]}\n'
    out = subprocess.run([sys.executable, "-m", "sandlab.verification.cli"], input=malformed, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 2 and out.stdout == "" and "line 3" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_without_bubblewrap_one_line_or_explicitly_unsandboxed(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prlimit").symlink_to("/usr/bin/prlimit")
    monkeypatch.setenv("PATH", str(bin_dir))  # a node without bwrap
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(bwrap\) is not installed.*allow_unsandboxed") as info:
        CodeVerifier(workers=1)
    assert "\n" not in str(info.value)
    with CodeVerifier(workers=1, timeout_s=TIMEOUT_S, allow_unsandboxed=True) as unsandboxed:
        result = unsandboxed.verify(CodeItem(block("print(int(input()) + 1)"), (stdin("1", "2"),)))
        assert result.passed and not result.sandboxed and not unsandboxed.sandboxed
        looped = unsandboxed.verify(CodeItem(block("while True:\n    pass"), (stdin("", "1"),)))
        assert looped.statuses == [TIMEOUT]  # the limits still hold
