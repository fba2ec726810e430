"""Functions sent by value are pickled once and reused, yet a changed global is always seen."""
from __future__ import annotations

import os
import textwrap


def notebook(source: str) -> dict:
    """Run ``source`` as a notebook cell would: in a ``__main__`` namespace, so cloudpickle
    sends its functions by value."""
    ns = {"__name__": "__main__"}
    exec(textwrap.dedent(source), ns)
    return ns


def counted(pool, fn, *args):
    """The call's result, and whether the parent reused the function's pickle."""
    hits = pool._packer.functions.hits
    result = pool.call(fn, *args)
    return result, pool._packer.functions.hits > hits


def test_unchanged_function_is_pickled_once_and_changes_are_seen(make_pool):
    pool = make_pool(max=1)
    ns = notebook("""
        import math
        K = 2
        NAMES = ("a", "b")
        def helper(x):
            return x * K
        def f(x, scale=1):
            return helper(x) * scale + math.floor(0.5) + len(NAMES)
    """)
    f = ns["f"]
    assert counted(pool, f, 1) == (4, False)
    assert counted(pool, f, 1) == (4, True)  # same function, nothing changed: cached
    ns["K"] = 10  # a global of a helper it calls
    assert counted(pool, f, 1) == (12, False)
    assert counted(pool, f, 1) == (12, True)
    ns["NAMES"] = ("a",)  # a global of the function itself
    assert pool.call(f, 1) == 11
    f.__defaults__ = (2,)
    assert pool.call(f, 1) == 21
    exec("def helper(x):\n    return -x", ns)  # the helper redefined, as by re-running a cell
    assert pool.call(f, 1) == -1


def test_mutable_globals_and_closures_are_never_stale(make_pool):
    pool = make_pool(max=1)
    ns = notebook("""
        SEEN = [1]
        CONFIG = {"n": 1}
        def total():
            return sum(SEEN) + CONFIG["n"]
        def make():
            step = 1
            def add(x):
                return x + step
            def bump():
                nonlocal step
                step += 1
            return add, bump
    """)
    total = ns["total"]
    assert counted(pool, total) == (2, False)
    ns["SEEN"].append(5)  # changed in place: same object, new content
    ns["CONFIG"]["n"] = 10
    assert counted(pool, total) == (16, False)  # never cached: pickled every call
    add, bump = ns["make"]()
    assert counted(pool, add, 1) == (2, False)
    assert counted(pool, add, 1) == (2, True)
    bump()  # rebinds the closure variable
    assert counted(pool, add, 1) == (3, False)


def test_a_global_defined_after_the_first_call_is_seen(make_pool):
    pool = make_pool(max=1)
    ns = notebook("""
        def later():
            try:
                return LATER
            except NameError:
                return "undefined"
    """)
    assert pool.call(ns["later"]) == "undefined"
    assert pool.call(ns["later"]) == "undefined"
    ns["LATER"] = "defined"
    assert pool.call(ns["later"]) == "defined"


def test_classes_defined_in_the_notebook_are_resent_each_call(make_pool):
    pool = make_pool(max=1)
    ns = notebook("""
        class Point:
            def norm(self):
                return 1
        def use():
            return Point().norm()
    """)
    assert pool.call(ns["use"]) == 1
    exec("def norm(self):\n    return 2\nPoint.norm = norm", ns)  # the class changed in place
    assert counted(pool, ns["use"]) == (2, False)


def test_the_cloudpickle_internals_the_cache_relies_on_still_exist():
    # functions.py falls back safely (more re-pickling) without them; this says so loudly.
    from cloudpickle import cloudpickle as cp
    assert callable(getattr(cp, "_extract_code_globals", None)), "cloudpickle._extract_code_globals is gone"
    assert callable(getattr(cp, "_should_pickle_by_reference", None)), "cloudpickle._should_pickle_by_reference is gone"
    assert cp._should_pickle_by_reference(os.path.join) and not cp._should_pickle_by_reference(lambda: 1)
    assert "x" in cp._extract_code_globals((lambda: x).__code__)  # noqa: F821
