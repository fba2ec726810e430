"""Code sync: the first call on a host whose cache lacks the code, against the same call with
the code already cached there (issue #12), and the bytes each sends.

Runs a real sshd on loopback (needs root and openssh-server, as the tests do) and about 1 MB of
local code (a package of generated modules). Each sample is a fresh pool, from its creation
to its first result, over one SSH connection kept open (its set-up is not code sync's cost);
"fresh host" empties the runner's code cache before the pool starts. The two cases take turns.

    python benchmarks/bench_code.py [samples]
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import flame  # noqa: E402
from table import print_table, stats  # noqa: E402


def make_package(root: str, name: str, size: int = 1_000_000, modules: int = 100) -> None:
    import random
    rng = random.Random(12)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(3, 12)))
             for _ in range(2000)]  # source-like: compresses about as well as real code
    pkg = os.path.join(root, name)
    os.makedirs(pkg)
    per = size // modules
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("def answer():\n    from . import m0\n    return m0.VALUE\n")
    for i in range(modules):
        with open(os.path.join(pkg, f"m{i}.py"), "w") as f:
            lines, n = [f"VALUE = {i}\n"], 0
            while n < per:
                line = "# " + " ".join(rng.choice(words) for _ in range(10)) + "\n"
                lines.append(line)
                n += len(line)
            f.write("".join(lines))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    from services import Sshd
    work = tempfile.mkdtemp(prefix="flame-bench-code-")
    sshd = Sshd(work)
    cache = os.path.join(work, "cache")
    try:
        make_package(work, "benchcode")
        sys.path.insert(0, work)
        pkg = importlib.import_module("benchcode")
        backend = flame.SSHBackend([sshd.host], python=sys.executable, key=sshd.client_key,
                                   known_hosts=None, env={"XDG_CACHE_HOME": cache})
        samples: dict[str, list[float]] = {"fresh host": [], "cached": []}
        sent: dict[str, list[int]] = {"fresh host": [], "cached": []}

        def run(case: str) -> None:
            if case == "fresh host":
                shutil.rmtree(cache, ignore_errors=True)
            t = time.perf_counter()
            with flame.Pool(backend, max=1, code_exclude=["bench_*", "test_*"]) as pool:
                assert pool.call(pkg.answer) == 0
                samples[case].append(time.perf_counter() - t)
                sent[case].append(pool.code_bytes_sent)
        run("cached")  # opens the SSH connection, fills the cache
        for case in ("cached", "fresh host"):
            samples[case].clear(), sent[case].clear()
        for _ in range(n):
            for case in ("fresh host", "cached"):
                run(case)
        rows = []
        base = stats(samples["cached"])[0]
        for case in ("fresh host", "cached"):
            med, p90 = stats(samples[case])
            rows.append([case, f"{med * 1000:.0f}", f"{p90 * 1000:.0f}", f"{(med - base) * 1000:+.0f}",
                         f"{max(sent[case]):,}"])
        print(f"\nfirst call of a fresh SSH pool, ~1 MB of local code ({n} samples each, interleaved)\n")
        print_table(["case", "median ms", "p90 ms", "vs cached ms", "bytes sent"], rows)
        backend.close()
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
