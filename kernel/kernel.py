"""FlameKernel: IPython's kernel, with flame pools made native."""
from __future__ import annotations

import asyncio

from ipykernel.ipkernel import IPythonKernel
from ipykernel.jsonutil import json_clean

from .charts import Charts
from .ipykernel_adapter import send_on_shell
from .outputs import CellProgress, CellSink

BANNER_EXTRA = ("flamebook: `import flame; pool = flame.Pool()` runs functions on runners; "
                "their output lands in the cell that called them. %flame lists pools; "
                "%%remote runs a cell on a runner.")


class FlameKernel(IPythonKernel):
    implementation = "flamebook"
    implementation_version = "0.1.0"

    #: The app this notebook is attached to (a flame.AppConnection), or None: cells run here.
    app = None
    #: The pool whose runner this notebook's cells run on (``%attach POOL``), or None.
    attached_pool = None

    @property
    def banner(self) -> str:  # type: ignore[override]
        text = super().banner + "\n" + BANNER_EXTRA
        if self.app is not None:
            text += "\n" + self.where()
        return text

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import flame

        from .magics import FlameMagics
        self.charts = Charts(self)
        flame.set_sink_factory(lambda: CellSink(self))
        flame.set_progress_factory(lambda: CellProgress(self))
        self.flame_magics = FlameMagics(self.shell)
        self.shell.register_magics(self.flame_magics)

    # ---- attach ----------------------------------------------------------------------
    def where(self) -> str:
        pool = self.attached_pool
        if pool is not None:
            runner = self.flame_magics.pinned(pool)
            on = f"runner {runner}" if runner else "a runner (booted or chosen at the next cell)"
            return f"attached to {pool.name}: cells run on {on}; %detach to run cells here again"
        app = self.app
        if app is None:
            return "not attached: cells run in this kernel"
        argv = " ".join(app.info.get("argv") or [])
        return f"attached to pid {app.pid} on {app.host} ({argv}); %detach to run cells here again"

    def attach(self, target: str) -> str:
        """``%attach POOL`` (a flame.Pool of this notebook, by name) or ``%attach APP`` (a served
        app's connection file or name)."""
        from flame import Pool, connect
        pool = self.shell.user_ns.get(target) if target.isidentifier() else None
        if self.app is not None or self.attached_pool is not None:
            self.detach()
        if isinstance(pool, Pool):
            if pool.closed:
                raise ValueError(f"{target} is shut down")
            self.attached_pool = pool
        else:
            self.app = connect(target)
        return self.where()

    def detach(self) -> str:
        pool, self.attached_pool = self.attached_pool, None
        if pool is not None:
            runner = self.flame_magics.unpin(pool)
            back = f"; runner {runner} goes back to {pool.name}" if runner else ""
            return f"detached from {pool.name}{back}; cells run in this kernel again"
        app, self.app = self.app, None
        if app is not None:
            app.close()
            return f"detached from pid {app.pid} on {app.host}; cells run in this kernel again"
        return "not attached"

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **kwargs):
        parent = self.get_parent("shell")
        try:
            return await self._execute(code, silent, store_history, user_expressions, allow_stdin, **kwargs)
        finally:  # the cell's live chart, if its calls reported, shows all they reported
            self.charts.cell_done(parent)

    async def _execute(self, code, silent, store_history=True, user_expressions=None,
                       allow_stdin=False, **kwargs):
        app = self.app
        local = code.lstrip().startswith(("%attach", "%detach", "%flame"))
        if self.attached_pool is not None and not local:  # the cell runs on the pool's runner
            code = "%%flame_attached\n" + code
        if app is None or local:
            return await super().do_execute(code, silent, store_history, user_expressions,
                                            allow_stdin, **kwargs)
        from flame import AppGone
        shell = self.shell
        count = shell.execution_count
        if store_history:  # the cell is this notebook's history (In, %history), as a local one
            shell.history_manager.store_inputs(count, code, code)
            shell.execution_count += 1
        try:
            reply = app.run(code, user_expressions=user_expressions,
                             execution_count=count if store_history else None)
            if reply.get("data") is not None and not silent:
                self.send_response(self.iopub_socket, "execute_result", {
                    "execution_count": count, "data": reply["data"], "metadata": reply.get("metadata", {})})
            return {"status": "ok", "execution_count": count,
                    "user_expressions": reply.get("user_expressions", {}), "payload": []}
        except AppGone as exc:
            self.detach()
            error = {"ename": "AppGone", "evalue": f"{exc}; detached: cells run in this kernel again",
                     "traceback": [f"AppGone: {exc}", "The notebook is detached and runs cells locally again."]}
        except KeyboardInterrupt as exc:
            error = {"ename": "KeyboardInterrupt", "evalue": str(exc),
                     "traceback": [f"KeyboardInterrupt: {exc}"]}
        except BaseException as exc:  # noqa: BLE001 - a remote cell's error, shown like a local one
            tb = getattr(exc, "remote_traceback", None) or getattr(exc, "traceback", "") or ""
            name = getattr(exc, "type_name", None) or type(exc).__name__
            error = {"ename": name.rsplit(".", 1)[-1], "evalue": str(getattr(exc, "message", exc)),
                     "traceback": (tb.rstrip().splitlines() if tb else [f"{name}: {exc}"])}
        if not silent:
            self.send_response(self.iopub_socket, "error", error)
        return {"status": "error", "execution_count": count, **error}

    async def shell_channel_thread_main(self, msg):
        """While attached, answer completion and inspection on the shell channel thread.

        Frontends (JupyterLab included) send complete_request on the main shell, where it
        would wait behind a cell that runs in the app. ipykernel 7 hands every shell message
        to this thread first; requests that the app answers anyway are answered here, at
        once, and everything else goes on as usual. Without that thread (other ipykernel
        versions) requests simply take the usual route.
        """
        if self.session is not None:
            try:
                idents, frames = self.session.feed_identities(msg, copy=False)
                # Peek first: a full deserialize records the signature against replays, and
                # a message passed on is deserialized again further down.
                kind = self.session.deserialize(frames, content=False, copy=False)["header"]["msg_type"]
                if kind in ("complete_request", "inspect_request") and self.app is None \
                        and self.attached_pool is None:
                    code = self.session.unpack(frames[4].bytes).get("code", "")
                    if not code.lstrip().startswith("%%remote"):
                        kind = None  # a local completion: the usual route
            except Exception:
                kind = None
            if kind in ("complete_request", "inspect_request"):
                request = self.session.deserialize(frames, content=True, copy=False)
                content = request["content"]
                if kind == "complete_request":
                    ask, args, reply_type = self.do_complete, (content["code"], content["cursor_pos"]), "complete_reply"
                else:
                    ask, args, reply_type = self.do_inspect, (content["code"], content["cursor_pos"],
                                                              content.get("detail_level", 0)), "inspect_reply"
                answer = await asyncio.to_thread(ask, *args)  # the app answers; this loop stays free
                reply = self.session.msg(reply_type, json_clean(answer), parent=request)
                send_on_shell(self, self.session.serialize(reply, ident=idents))
                return
        return await super().shell_channel_thread_main(msg)

    def do_complete(self, code, cursor_pos):
        if self.app is not None:
            try:
                return self.app.complete(code, cursor_pos)
            except Exception:
                self.log.warning("flamebook: completion from the attached app failed", exc_info=True)
        remote = self._on_runner("complete", code, cursor_pos) or self._remote_attributes(code, cursor_pos)
        if remote is not None:
            return remote
        return super().do_complete(code, cursor_pos)

    def _remote_attributes(self, code, cursor_pos):
        """Tab after ``obj.`` where ``obj`` is a flame.Remote: its attributes, listed on its runner."""
        import re

        import flame
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        m = re.search(r"([A-Za-z_][\w]*)\.(\w*)$", code[:cursor_pos])
        obj = self.shell.user_ns.get(m.group(1)) if m else None
        if not isinstance(obj, flame.Remote):
            return None
        try:
            names = obj.__dir__()
        except Exception:
            self.log.warning("flamebook: listing a Remote's attributes failed", exc_info=True)
            return None
        prefix = m.group(2)
        matches = [n for n in names if n.startswith(prefix) and (prefix.startswith("_") or not n.startswith("_"))]
        return {"status": "ok", "matches": matches, "cursor_start": cursor_pos - len(prefix),
                "cursor_end": cursor_pos, "metadata": {}}

    def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        if self.app is not None:
            try:
                return self.app.inspect(code, cursor_pos, detail_level)
            except Exception:
                self.log.warning("flamebook: inspection from the attached app failed", exc_info=True)
        remote = self._on_runner("inspect", code, cursor_pos, detail_level) or \
            self._remote_inspection(code, cursor_pos, detail_level)
        if remote is not None:
            return remote
        return super().do_inspect(code, cursor_pos, detail_level, omit_sections)

    def _remote_inspection(self, code, cursor_pos, detail_level):
        """``obj?`` where ``obj`` is a flame.Remote: its docstring and signature, from its runner."""
        import re

        import flame
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        left = re.search(r"[A-Za-z_][\w.]*$", code[:cursor_pos])
        right = re.match(r"\w*", code[cursor_pos:])
        name = ((left.group(0) if left else "") + (right.group(0) if right else "")).strip(".")
        head, *rest = name.split(".") if name else [""]
        obj = self.shell.user_ns.get(head)
        if not isinstance(obj, flame.Remote):
            return None
        for part in rest:
            obj = getattr(obj, part)
        try:
            return flame.inspect_remote(obj, detail_level)
        except Exception:
            self.log.warning("flamebook: inspecting a Remote failed", exc_info=True)
            return None

    def _on_runner(self, kind, code, cursor_pos, detail_level=0):
        """Completion or inspection in a ``%%remote`` cell, from the runner its namespace lives on."""
        if cursor_pos is None:
            cursor_pos = len(code)
        target = self.flame_magics.remote_target(code, cursor_pos)
        if target is None:
            return None
        pool, runner, body, cursor, offset = target
        try:
            if kind == "inspect":
                return pool.inspect(body, cursor, detail_level, runner_id=runner)
            reply = pool.complete(body, cursor, runner_id=runner)
        except Exception:
            self.log.warning("flamebook: %s from a runner failed", kind, exc_info=True)
            return None
        if "cursor_start" in reply:
            reply["cursor_start"] += offset
            reply["cursor_end"] += offset
        return reply

    def do_shutdown(self, restart):
        # Stop every runner now rather than at interpreter exit: a restart must not wait
        # for runners of the old session to notice the missing heartbeat.
        import flame
        flame.shutdown_all()
        self.detach()  # the app keeps running
        return super().do_shutdown(restart)
